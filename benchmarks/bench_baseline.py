"""The `full` baseline against the model's own forward: TTFT on the same token ids, side by side.

Variants, interleaved per repeat so a burst of load on a shared machine hits all of them:
  hf           template + plan, then transformers' `model(ids, logits_to_keep=1)` (eval's `hf`)
  engine-full  `Engine.run(strategy="full")`: the model's own forward, KV copied into decode buffers
  blend-full   template + plan, then the layer-by-layer blend loop computing every token (the
               engine's `full` before it ran the model's forward)
Prints the median TTFT per variant and the median per-prompt ratio to `hf`; writes JSON.
    python benchmarks/bench_baseline.py --data PATH/musique_s.json --format musique --limit 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from ragkv.blend import blend, make_strategy
from ragkv.engine.engine import Engine
from ragkv.engine.stopwatch import Stopwatch
from ragkv.eval.datasets import FORMATS, load_samples
from ragkv.eval.runner import hf_ttft_ms
from ragkv.models import load_adapter
from ragkv.storage import MemoryTier, TieredStore

VARIANTS = ("hf", "engine-full", "blend-full")


def blend_full_ms(engine: Engine, question: str, chunks, reserve: int) -> float:
    """Template + plan, then the blend loop with the `full` strategy (no cached sources)."""
    watch = Stopwatch(engine.model.device)
    plan = engine.plan(question, chunks)
    blend(engine.model, plan, make_strategy("full"), [], reserve=reserve)
    watch.lap("blend-full")
    return watch.elapsed_ms()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_baseline.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset file")
    p.add_argument("--format", default="musique", choices=FORMATS)
    p.add_argument("--limit", type=int, default=4, help="prompts (default 4)")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="results-baseline.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(load_adapter(args.model, device=args.device), TieredStore([MemoryTier()]))
    samples = load_samples(args.data, args.format, args.limit, args.max_chunks)
    if not samples:
        raise SystemExit(f"no usable samples in {args.data} (format {args.format})")
    runs = {
        "hf": lambda s, c: hf_ttft_ms(engine, s.question, c),
        "engine-full": lambda s, c: engine.run(s.question, chunks=c, strategy="full", reserve=32).ttft_ms,
        "blend-full": lambda s, c: blend_full_ms(engine, s.question, c, reserve=32),
    }
    rows = []
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), median of {args.repeats}", flush=True)
    for sample in samples:
        chunks = engine.tokenize_chunks(sample.chunks)
        for run in runs.values():  # warm-up: first-touch allocations are not the forward's speed
            run(sample, chunks)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                times[v].append(runs[v](sample, chunks))
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        row = {
            "id": sample.id,
            "prompt_tokens": engine.plan(sample.question, chunks).num_tokens,
            "ttft_ms": med,
            "vs_hf": {v: med[v] / med["hf"] for v in VARIANTS},
            "runs_ms": times,
        }
        rows.append(row)
        print(
            f"{row['id']:>12} {row['prompt_tokens']:>6} tok  "
            + "  ".join(f"{v} {med[v]:7.0f} ms ({row['vs_hf'][v]:.3f}x)" for v in VARIANTS),
            flush=True,
        )
    summary = {
        v: {
            "ttft_ms_median": statistics.median(r["ttft_ms"][v] for r in rows),
            "ratio_to_hf_median": statistics.median(r["vs_hf"][v] for r in rows),
        }
        for v in VARIANTS
    }
    print("\n| variant | median TTFT (ms) | median TTFT / hf |\n|---|---|---|")
    for v, s in summary.items():
        print(f"| {v} | {s['ttft_ms_median']:.0f} | {s['ratio_to_hf_median']:.3f} |")
    result = {
        "model": args.model,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "data": str(args.data),
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
