"""Timing and printing for `bench_gpu`: CUDA-event timers, medians, peak memory, the row table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Milliseconds of a callable: CUDA events on CUDA (synchronized), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def median_ms(timer: Timer, fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        timer(fn)
    times = [timer(fn) for _ in range(repeats)]
    return statistics.median(times), times


def peak_gb(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak GPU memory (GB) allocated above what was allocated before `fn` (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)


def rounded(times: list[float]) -> list[float]:
    return [round(t, 2) for t in times]


HEADER = (
    f"{'tokens':>7} {'strategy':<16} {'source':<10} {'attn':<6} {'TTFT ms':>9} {'x HF':>6} {'limit':>6} "
    f"{'load ms':>8} {'waited':>7} {'peak GB':>8} {'recomp':>7}"
)


def print_row(r: dict) -> None:
    def f(key, fmt):
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else format("-", fmt.split(".")[0].rstrip("f"))

    print(
        f"{r['tokens']:>7} {r['strategy']:<16} {r['source']:<10} {r['attention']:<6} {f('ttft_ms', '>9.1f')} "
        f"{f('x_hf', '>6.2f')} {f('limit_x', '>6.2f')} {f('load_only_ms', '>8.1f')} {f('load_waited_ms', '>7.1f')} "
        f"{f('peak_gb', '>8.2f')} "
        f"{f('recompute_fraction', '>7.3f')}",
        flush=True,
    )
