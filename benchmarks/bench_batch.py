"""Batched fusion and decoding (engine/batch.py) against one request at a time, side by side.

For each batch size B (default 1, 4, 8, 16) and strategy, B questions of a data set with their first
`--max-chunks` passages (cache warm: every chunk precomputed first), interleaved per repeat:
  fuse   one at a time: `engine.fuse(r)` for each request  |  batched: `fuse_many(engine, requests)`
  decode one at a time: `step_many(engine, [s])` per stream to its end  |  batched: `step_many(engine,
         streams)` until every stream is done (greedy, `--tokens` each at most)
Prints the median wall times, the speed-up ratios in wall time and in this process's CPU time (less moved
by other processes on a shared machine), and the load average (before, after) of each row; checks the
batched tokens equal the one-at-a-time ones; writes JSON (with requests/s and tokens/s).
    python benchmarks/bench_batch.py --data ../shared/data/cacheblend/musique_s.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ragkv.engine.batch import fuse_many, start_stream, step_many
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import FORMATS, load_samples
from ragkv.models import load_adapter
from ragkv.storage import MemoryTier, TieredStore

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cacheblend" / "musique_s.json"


def _timed(fn) -> tuple[float, float, object]:
    """Wall seconds, this process's CPU seconds (less moved by other processes on a shared machine), result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def fuse_alone(engine, requests):
    fusions = [engine.fuse(r) for r in requests]
    for f in fusions:
        f.release()
    return fusions


def fuse_batched(engine, requests):
    fusions = fuse_many(engine, requests)
    for f in fusions:
        f.release()
    return fusions


def decode_alone(engine, fusions):
    streams = [start_stream(f) for f in fusions]
    for s in streams:
        while not s.done:
            step_many(engine, [s])
    return [s.tokens for s in streams]


def decode_batched(engine, fusions):
    streams = [start_stream(f) for f in fusions]
    while not all(s.done for s in streams):
        step_many(engine, streams)
    return [s.tokens for s in streams]


def measure(engine, requests, repeats: int) -> dict:
    """Median wall and CPU seconds of each of the four variants (interleaved per repeat), the fidelity check."""
    times = {"fuse_alone": [], "fuse_batched": [], "decode_alone": [], "decode_batched": []}
    cpu = {k: [] for k in times}
    load_before = os.getloadavg()[0]
    mismatched = 0
    tokens = 0
    for _ in range(repeats):
        t, c, alone = _timed(lambda: fuse_alone(engine, requests))
        times["fuse_alone"].append(t)
        cpu["fuse_alone"].append(c)
        t, c, batched = _timed(lambda: fuse_batched(engine, requests))
        times["fuse_batched"].append(t)
        cpu["fuse_batched"].append(c)
        t, c, want = _timed(lambda: decode_alone(engine, alone))
        times["decode_alone"].append(t)
        cpu["decode_alone"].append(c)
        t, c, got = _timed(lambda: decode_batched(engine, batched))
        times["decode_batched"].append(t)
        cpu["decode_batched"].append(c)
        mismatched = max(mismatched, sum(a != b for a, b in zip(want, got)))
        tokens = sum(len(x) for x in got)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    n = len(requests)
    return {
        "requests": n,
        "prompt_tokens": sum(f.run.prompt_tokens for f in batched),
        "decoded_tokens": tokens,
        "seconds": med,
        "cpu_seconds": med_cpu,
        "fuse_requests_per_s": {"alone": n / med["fuse_alone"], "batched": n / med["fuse_batched"]},
        "decode_tokens_per_s": {"alone": tokens / med["decode_alone"], "batched": tokens / med["decode_batched"]},
        "fuse_speedup": med["fuse_alone"] / med["fuse_batched"],
        "decode_speedup": med["decode_alone"] / med["decode_batched"],
        "fuse_cpu_speedup": med_cpu["fuse_alone"] / med_cpu["fuse_batched"],
        "decode_cpu_speedup": med_cpu["decode_alone"] / med_cpu["decode_batched"],
        "answers_differing": mismatched,
        "load_avg": [load_before, os.getloadavg()[0]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_batch.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data set file (default: the shared musique_s.json)")
    p.add_argument("--format", default="musique", choices=FORMATS)
    p.add_argument("--sizes", default="1,4,8,16", help="batch sizes (comma-separated)")
    p.add_argument("--strategies", default="cacheblend", help="comma-separated (default: cacheblend)")
    p.add_argument("--max-chunks", type=int, default=3, help="passages per question (default 3)")
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per request at most (default 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="results-batch.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    engine = Engine(load_adapter(args.model, device=args.device), TieredStore([MemoryTier()]))
    samples = load_samples(args.data, args.format, max(sizes), args.max_chunks)
    if len(samples) < max(sizes):
        raise SystemExit(f"{args.data} has {len(samples)} usable samples, fewer than the largest batch {max(sizes)}")
    docs = [(s.question, engine.tokenize_chunks(s.chunks)) for s in samples]
    for _, chunks in docs:  # cache warm
        engine.ensure_cached(chunks)
    rows = []
    print(
        f"{args.model} on {args.device} ({torch.get_num_threads()} threads), {args.max_chunks} passages per "
        f"question, <= {args.tokens} tokens each, median of {args.repeats}",
        flush=True,
    )
    print(f"{'strategy':<12}{'B':>4}{'fuse 1-by-1 s':>15}{'batched s':>11}{'x':>6}{'x cpu':>7}{'decode 1-by-1 s':>17}"
          f"{'batched s':>11}{'x':>6}{'x cpu':>7}{'differ':>8}  load avg")  # fmt: skip
    for strategy in args.strategies.split(","):
        for b in sizes:
            requests = [engine.request(q, chunks=c, strategy=strategy, max_new_tokens=args.tokens) for q, c in docs[:b]]
            fuse_batched(engine, requests[:2])  # warm-up: first-touch allocations
            row = {"strategy": strategy, **measure(engine, requests, args.repeats)}
            rows.append(row)
            s = row["seconds"]
            print(
                f"{strategy:<12}{b:>4}{s['fuse_alone']:>15.2f}{s['fuse_batched']:>11.2f}{row['fuse_speedup']:>6.2f}"
                f"{row['fuse_cpu_speedup']:>7.2f}{s['decode_alone']:>17.2f}{s['decode_batched']:>11.2f}"
                f"{row['decode_speedup']:>6.2f}{row['decode_cpu_speedup']:>7.2f}"
                f"{row['answers_differing']:>8}  {row['load_avg'][0]:.1f} -> {row['load_avg'][1]:.1f}",
                flush=True,
            )
    out = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "device": args.device,
        "max_chunks": args.max_chunks,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
