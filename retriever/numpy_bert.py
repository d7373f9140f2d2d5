"""NumpyBertEmbedder: a BERT encoder's forward pass in numpy (the bundled all-MiniLM-L6-v2 is one),
mean-pooled and L2-normalised like HFEmbedder, without importing torch or transformers.

`ragkv retrieve` embeds one question: loading torch and transformers would take longer than the whole
search. The tokenizer is the encoder's own `tokenizer.json` (the `tokenizers` library), the weights its
`model.safetensors` (read as numpy arrays). The vectors equal HFEmbedder's within float32 rounding
(tests/test_numpy_bert.py); `supports(folder)` says which encoders this covers, the others keep HFEmbedder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
_FEW_ROWS = 64  # tokens of a batch computed without BLAS threads (a question or two)
_ERF = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # Abramowitz-Stegun 7.1.26


class NumpyBertEmbedder:
    """A BERT encoder with absolute positions, in numpy float32; `dim` and `name` as HFEmbedder's."""

    def __init__(self, folder: Path, name: str, batch_size: int = 32, max_length: int = 256) -> None:
        if not self.supports(folder):
            raise ValueError(f"{folder} is not a BERT encoder with tokenizer.json and model.safetensors")
        self.config = json.loads((folder / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)  # as HFEmbedder's tokenizer call (truncation=True)
        self.tokenizer.no_padding()  # batches are padded here, with the attention mask
        weights = load_file(folder / "model.safetensors")
        self.w = {k.removeprefix("bert."): v.astype(np.float32, copy=False) for k, v in weights.items()}
        self.dim = int(self.config["hidden_size"])
        self.name = name
        self.batch_size = batch_size
        self.heads = int(self.config["num_attention_heads"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))

    @staticmethod
    def supports(folder: Path) -> bool:
        """A BERT encoder (absolute positions, a GELU activation) with the files this class reads."""
        if not all((folder / f).is_file() for f in ("config.json", "tokenizer.json", "model.safetensors")):
            return False
        config = json.loads((folder / "config.json").read_text())
        return (
            config.get("model_type") == "bert"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and config.get("hidden_act") in _ACTIVATIONS
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors, computed in batches of similar lengths."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in idx])
            width = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(idx), width), dtype=np.int64)  # [B, T], padded with id 0
            mask = np.zeros((len(idx), width), dtype=np.float32)  # [B, T]
            for row, e in enumerate(encodings):
                ids[row, : len(e.ids)] = e.ids
                mask[row, : len(e.ids)] = 1.0
            hidden = self._encode(ids, mask)  # [B, T, dim]
            pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)  # [B, dim]
            norms = np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
            out[idx] = pooled / norms
        return out

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last hidden states [B, T, dim] of ids [B, T] (token type 0 everywhere)."""
        w, t = self.w, ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        masked = (1.0 - mask)[:, None, None, :] * np.finfo(np.float32).min  # [B, 1, 1, T]: padding gets no attention
        for layer in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{layer}."
            attended = self._attention(x, masked, p + "attention.self.")
            x = self._norm(self._linear(attended, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            inner = self._gelu(self._linear(x, p + "intermediate.dense"))
            x = self._norm(self._linear(inner, p + "output.dense") + x, p + "output.LayerNorm")
        return x

    def _attention(self, x: np.ndarray, masked: np.ndarray, prefix: str) -> np.ndarray:
        b, t, _ = x.shape
        d = self.dim // self.heads

        def heads(name: str) -> np.ndarray:  # [B, H, T, D]
            return self._linear(x, prefix + name).reshape(b, t, self.heads, d).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d)) + masked  # [B, H, T, T]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        return (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, self.dim)  # [B, T, dim]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        weight, bias = self.w[name + ".weight"], self.w[name + ".bias"]
        if x.shape[0] * x.shape[1] <= _FEW_ROWS:  # one thread: BLAS would hand a question's rows to its threads,
            return np.einsum("btk,nk->btn", x, weight) + bias  # which on a busy machine wait (24 ms vs 1.5 ms each)
        return x @ weight.T + bias

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + np.float32(self.eps)) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _gelu(self, x: np.ndarray) -> np.ndarray:
        if self.config["hidden_act"] != "gelu":  # the tanh approximation
            return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)))
        return 0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (numpy has none; float32 keeps about 7 digits anyway)."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (_ERF[0] + t * (_ERF[1] + t * (_ERF[2] + t * (_ERF[3] + t * _ERF[4]))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)
