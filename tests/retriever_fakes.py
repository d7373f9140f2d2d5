"""Small offline stand-ins for the retriever tests: a byte-level tokenizer, a hashing embedder, a tiny adapter."""

from __future__ import annotations

import re
import zlib

import numpy as np

from ragkv.storage.services import StoreServices


def byte_tokenizer():
    """A fast byte-level tokenizer without merges: one token per UTF-8 byte, ids 0..255 (fits the tiny models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class HashEmbedder:
    """Bag of words hashed into 64 dims, L2-normalised: deterministic, instant, shares words -> similar."""

    dim = 64
    name = "hash64"

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def embed(self, texts):
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


def tiny_byte_adapter():
    """The tiny random Llama wrapped with the byte tokenizer (sink = token 1)."""
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    return adapter_for(tiny_model("llama"), byte_tokenizer(), sink_ids=(1,))


def paragraphs(n: int, seed: int = 0) -> str:
    """`n` paragraphs of 3-6 sentences of made-up words, reproducible."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "lamp", "orbit", "maple", "quartz", "tide"]
    paras = []
    for _ in range(n):
        sents = [
            " ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "." for _ in range(rng.integers(3, 7))
        ]
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


class DictStore:
    """The store surface ingestion uses (lookup / put / get / remove, services), in a dict; `fail_after` puts raise."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.entries = {}
        self.fail_after = fail_after
        self.puts = 0
        self.services = StoreServices([])  # chunk metadata and variant records, in memory (no tiers)

    def lookup(self, keys):
        return ["dict" if k in self.entries else None for k in keys]

    def put(self, key, kv, cost=None, durable=False, write_behind=False) -> None:
        if self.fail_after is not None and self.puts >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.entries[key] = kv
        self.puts += 1

    def get(self, key):
        return self.entries.get(key)

    def remove(self, key) -> bool:
        return self.entries.pop(key, None) is not None


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica (hand-built, with a correct xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out
