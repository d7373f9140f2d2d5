"""`ragkv demo`: the main job on embedded defaults. Shipped documents are cached once, then each
shipped question is answered with a full prefill and with blended reuse, printing TTFT for each."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="answer shipped questions with full prefill vs blended reuse",
                       description="Cache the chunk KV of a few shipped documents, then answer shipped questions "
                                   "with a full prefill and with CacheBlend reuse, printing answers and TTFT.")
    p.add_argument("--model", default="smollm2", help="model alias, local path or cached HF id (default smollm2)")
    p.add_argument("--strategy", default="cacheblend", help="fusion strategy to compare with full (default cacheblend)")
    p.add_argument("--ratio", type=float, default=0.15, help="recompute ratio (default 0.15)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine

    demo = resources.files("ragkv.server") / "demo"
    documents = {p.name: p.read_text(encoding="utf-8") for p in sorted(demo.iterdir()) if p.name.endswith(".txt")}
    questions = [json.loads(line) for line in (demo / "questions.jsonl").read_text().splitlines() if line.strip()]
    print(f"loading {args.model} ...", flush=True)
    engine = Engine.from_pretrained(args.model)
    chunks = engine.tokenize_chunks(list(documents.values()))
    t0 = time.perf_counter()
    _, _, misses = engine.ensure_cached(chunks)
    print(f"cached {misses} chunk(s) ({sum(map(len, chunks))} tokens) in {time.perf_counter() - t0:.1f}s: "
          f"{', '.join(documents)}\n")
    print(f"{'question':58s} {'strategy':16s} {'TTFT ms':>8s} {'speedup':>7s}  answer")
    for q in questions:
        full = engine.generate(q["question"], chunks=chunks, strategy="full", max_new_tokens=args.max_new_tokens)
        fused = engine.generate(q["question"], chunks=chunks, strategy=args.strategy, recompute_ratio=args.ratio,
                                max_new_tokens=args.max_new_tokens)
        label = f"{args.strategy}@{args.ratio:g}"
        print(f"{q['question'][:58]:58s} {'full':16s} {full.ttft_ms:8.0f} {1.0:7.2f}  {full.text!r}")
        print(f"{'':58s} {label:16s} {fused.ttft_ms:8.0f} {full.ttft_ms / fused.ttft_ms:7.2f}  {fused.text!r}"
              f"  (hits {sum(fused.hits.values())}/{len(chunks)}, recomputed {fused.recompute_fraction:.0%})")
    return 0
