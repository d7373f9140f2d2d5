"""`ragkv bench codecs`: every codec on real chunk KV (size, speed, error, and blend fidelity).

Chunk KV comes from the model over the chunks of the first N dataset records, stored as fp16 (what a
tier holds). Speeds are fp16-equivalent bytes per second. Fidelity runs `cacheblend@RATIO` with the
chunk KV passed through each codec and compares its first-token distribution with a full prefill.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ...chunk_cache import ChunkKV, LayeredKV, precompute_many
from ...compression import Codec, codec_names, get_codec

Roundtrip = Callable[[ChunkKV], LayeredKV]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `bench codecs` measures every codec on real chunk KV")
    p.add_argument("what", choices=["codecs"], help="what to benchmark")
    p.add_argument("--model", default="smollm2", help="model alias or path (default smollm2)")
    p.add_argument("--data", required=True, help="dataset file (musique JSON)")
    p.add_argument("--format", default="musique", choices=["musique"], help="dataset format")
    p.add_argument("--limit", type=int, default=2, help="records to take chunks from (default 2)")
    p.add_argument("--codecs", default=",".join(codec_names()), help="comma-separated codec names (default all)")
    p.add_argument("--ratio", type=float, default=0.15, help="cacheblend recompute ratio for fidelity")
    p.add_argument("--no-fidelity", action="store_true", help="skip the cacheblend fidelity columns")
    p.add_argument("--out", default="codecs.json", help="JSON results file")
    p.set_defaults(func=run)


def load_musique(path: str | Path, limit: int) -> list[dict]:
    """The first `limit` records `{"ctxs": [{"title", "text"}], "question", "answers"}` of a musique file."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list) or not records or "ctxs" not in records[0]:
        raise ValueError(f"{path}: expected a musique JSON list of {{ctxs, question, answers}} records")
    return records[:limit]


def codec_stats(codec: Codec, kvs: Sequence[ChunkKV]) -> dict[str, float]:
    """bits_per_value, ratio_vs_fp16, encode/decode MB/s (fp16-equivalent) and rel_error over `kvs`."""
    values = sum(kv.kv.numel() for kv in kvs)
    t0 = time.perf_counter()
    encoded = [codec.encode(kv) for kv in kvs]
    t1 = time.perf_counter()
    decoded = [codec.decode(e) for e in encoded]
    t2 = time.perf_counter()
    nbytes = sum(e.nbytes + len(json.dumps(e.meta)) for e in encoded)  # payload + catalog metadata
    err = sum(float((d.kv.float() - kv.kv.float()).pow(2).sum()) for d, kv in zip(decoded, kvs))
    norm = sum(float(kv.kv.float().pow(2).sum()) for kv in kvs)
    return {"bits_per_value": 8 * nbytes / values, "ratio_vs_fp16": 2 * values / nbytes,
            "encode_mb_s": 2 * values / (t1 - t0) / 1e6, "decode_mb_s": 2 * values / (t2 - t1) / 1e6,
            "rel_error": (err / norm) ** 0.5, "stated_rel_error": getattr(codec, "rel_error", 0.0)}


def blend_fidelity(model, prompts: Sequence[dict], roundtrip: Roundtrip, ratio: float) -> dict[str, float]:
    """kl_mean / top1_agreement of cacheblend@ratio (chunk KV through `roundtrip`) against a full prefill.

    The hook for the eval harness: `prompts` carry `plan`, `kvs` (per chunk) and `full_logits`.
    """
    from ...blend import blend, make_strategy

    strategy = make_strategy("cacheblend", ratio)
    kls, agree = [], []
    for p in prompts:
        sources = [(start, roundtrip(kv).to(dtype=model.dtype)) for (start, _), kv in zip(p["plan"].chunk_spans, p["kvs"])]
        logits = blend(model, p["plan"], strategy, sources).logits.float()  # [vocab]
        ref = p["full_logits"].log_softmax(-1)
        kls.append(float((ref.exp() * (ref - logits.log_softmax(-1))).sum()))
        agree.append(float(ref.argmax() == logits.argmax()))
    return {"kl_mean": sum(kls) / len(kls), "top1_agreement": sum(agree) / len(agree)}


def _prompts(model, records: Sequence[dict], chunk_ids: list[list[int]], kvs: list[ChunkKV]) -> list[dict]:
    """One blend prompt per record (instruction, its chunks, the question) with its full-prefill logits."""
    from ...blend import blend, make_plan, make_strategy

    tok = model.tokenizer
    prefix = list(model.sink_ids) + tok("Answer the question from the documents.\n\n", add_special_tokens=False)["input_ids"]
    out, i = [], 0
    for r in records:
        n = len(r["ctxs"])
        query = tok(f"\n\nQuestion: {r['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        plan = make_plan(prefix, chunk_ids[i : i + n], query)
        full = blend(model, plan, make_strategy("full")).logits.float()  # [vocab]
        out.append({"plan": plan, "kvs": kvs[i : i + n], "full_logits": full})
        i += n
    return out


def run(args: argparse.Namespace) -> int:
    from ...adapters import load_adapter

    names = [n.strip() for n in args.codecs.split(",") if n.strip()]
    codecs = {n: get_codec(n) for n in names}  # unknown names fail here, before any model work
    records = load_musique(args.data, args.limit)
    model = load_adapter(args.model)
    torch.set_grad_enabled(False)
    chunk_ids = [model.tokenizer(f"{c['title']}\n{c['text']}", add_special_tokens=False)["input_ids"]
                 for r in records for c in r["ctxs"]]
    t0 = time.perf_counter()
    kvs = [kv.to(dtype=torch.float16) for kv in precompute_many(model, chunk_ids, max_tokens_per_pass=2048)]
    print(f"{len(kvs)} chunks, {sum(k.num_tokens for k in kvs)} tokens, precomputed in {time.perf_counter() - t0:.1f}s")
    rows = {n: codec_stats(c, kvs) for n, c in codecs.items()}
    if not args.no_fidelity:
        prompts = _prompts(model, records, chunk_ids, kvs)
        base = blend_fidelity(model, prompts, lambda kv: kv, args.ratio)
        seen: dict[str, dict[str, float]] = {}
        for n, c in codecs.items():
            core = n.removeprefix("lz4+") if n.startswith("lz4+") else ("identity" if n == "lz4" else n)
            if core not in seen:  # lz4 is lossless: lz4+X decodes to exactly X's tensors
                seen[core] = base if get_codec(core).lossless else blend_fidelity(
                    model, prompts, lambda kv, c=get_codec(core): c.decode(c.encode(kv)), args.ratio)
            rows[n].update({**seen[core], "kl_vs_uncompressed": seen[core]["kl_mean"] / max(base["kl_mean"], 1e-12)})
    meta = {"model": args.model, "data": str(args.data), "limit": args.limit, "chunks": len(kvs),
            "tokens": sum(k.num_tokens for k in kvs), "ratio": args.ratio, "torch_threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps({"meta": meta, "codecs": rows}, indent=2))
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """The results as a markdown table, one row per codec."""
    cols = ["bits_per_value", "ratio_vs_fp16", "encode_mb_s", "decode_mb_s", "rel_error", "stated_rel_error",
            "kl_mean", "kl_vs_uncompressed", "top1_agreement"]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    lines = ["| codec | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.4g}" if c in r else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
