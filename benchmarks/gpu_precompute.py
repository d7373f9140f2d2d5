"""The GPU benchmark's precompute rows: prepacked chunk KV precompute (one pass, variable-length attention per
chunk) against one chunk per pass, at each `--precompute-tokens` length (bench_gpu.py)."""

from __future__ import annotations

import torch
from gpu_timing import Timer, median_ms  # benchmarks/ is on sys.path

from ragkv.chunk_cache import precompute_many


def bench_precompute(args, model, device: torch.device, rows: list) -> None:
    """Prepacked (one pass, variable-length attention per chunk) vs one chunk per pass."""
    timer = Timer(device)
    g = torch.Generator().manual_seed(2)
    for length in map(int, args.precompute_tokens.split(",")):
        chunks = [
            torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
            for _ in range(args.precompute_chunks)
        ]
        budget = args.precompute_chunks * (length + len(model.sink_ids))
        repeats, warmup = min(3, args.repeats), min(1, args.warmup)
        one, _ = median_ms(timer, lambda: precompute_many(model, chunks, 0), repeats, warmup)
        packed, _ = median_ms(timer, lambda: precompute_many(model, chunks, budget), repeats, warmup)
        row = dict(
            chunk_tokens=length,
            chunks=len(chunks),
            one_by_one_ms=round(one, 2),
            prepacked_ms=round(packed, 2),
            x_one_by_one=round(one / packed, 2),
        )
        rows.append(row)
        print(
            f"precompute {len(chunks)} x {length} tokens: one-by-one {one:.1f} ms, prepacked {packed:.1f} ms "
            f"({row['x_one_by_one']}x)",
            flush=True,
        )
