"""`ragkv demo`: the main job on embedded defaults. Shipped documents are ingested (chunked, embedded,
indexed, chunk KV precomputed and stored), then each shipped question retrieves its chunks and is
answered with a full prefill and with blended reuse, printing TTFT for each."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from .options import add_settings_args, load_engine, settings_of

FLAGS = {"strategy": "blend.strategy", "ratio": "blend.recompute_ratio", "max_new_tokens": "max_new_tokens"}
NAMESPACE = "demo"  # the demo's catalog and index live apart from the user's (DATA_DIR/tenants/demo)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="answer shipped questions with full prefill vs blended reuse",
        description="Cache the chunk KV of a few shipped documents, then answer shipped questions "
        "with a full prefill and with CacheBlend reuse, printing answers and TTFT.",
    )
    p.add_argument("--strategy", default=None, help="fusion strategy to compare with full (default cacheblend)")
    p.add_argument("--ratio", type=float, default=None, help="recompute ratio (default 0.15)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default 32)")
    p.add_argument("-k", type=int, default=3, help="chunks retrieved per question (default 3)")
    add_settings_args(p, FLAGS, namespace=False)  # the demo keeps its documents in its own namespace
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.ingest import IngestConfig

    demo = resources.files("ragkv.cli") / "demo"
    paths = sorted(str(p) for p in demo.iterdir() if p.name.endswith(".txt"))
    questions = [json.loads(line) for line in (demo / "questions.jsonl").read_text().splitlines() if line.strip()]
    settings = settings_of(args)
    strategy, ratio, max_new_tokens = settings.blend.strategy, settings.blend.recompute_ratio, settings.max_new_tokens
    engine = load_engine(settings)
    t0 = time.perf_counter()
    report = engine.ingest(paths, namespace=NAMESPACE, config=IngestConfig(progress=False))
    print(f"ingested {len(paths)} documents in {time.perf_counter() - t0:.1f}s: {report.summary()}\n")
    print(f"{'question':58s} {'strategy':16s} {'TTFT ms':>8s} {'speedup':>7s}  answer")
    for q in questions:
        hits = engine.retrieve(q["question"], args.k, namespace=NAMESPACE)
        chunks = [h.token_ids for h in hits]
        full = engine.generate(
            q["question"], chunks=chunks, strategy="full", max_new_tokens=max_new_tokens, namespace=NAMESPACE
        )
        fused = engine.generate(
            q["question"],
            chunks=chunks,
            strategy=strategy,
            recompute_ratio=ratio,
            max_new_tokens=max_new_tokens,
            namespace=NAMESPACE,
        )
        label = f"{strategy}@{ratio:g}"
        print(f"{q['question'][:58]:58s} {'full':16s} {full.ttft_ms:8.0f} {1.0:7.2f}  {full.text!r}")
        print(
            f"{'  chunks: ' + ', '.join(Path(h.doc_id).name for h in hits):58s} {label:16s} {fused.ttft_ms:8.0f} "
            f"{full.ttft_ms / fused.ttft_ms:7.2f}  {fused.text!r}  "
            f"(cache hits {sum(fused.hits.values())}/{len(chunks)}, "
            f"recomputed {fused.recompute_fraction:.0%})"
        )
    engine.close()
    return 0
