"""Lazy per-layer loading of cached chunk KV for the blend loop.

Iterating a `LayerLoader` yields, layer by layer, every source's rows concatenated in plan order
([2, N_cached, H_kv, D], compute dtype, compute device). On CUDA the next layer is copied on a side
stream from pinned host memory while the current layer computes; on CPU loading is inline. Either
way, sources offering `prefetch(layer)` (entries of a CPU-bound codec with a DecodePool) are asked
for the next `lookahead` layers first, so worker processes decode them while this layer computes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..chunk_cache import LayeredKV


class LayerLoader:
    """Yields cached rows per layer; `seconds` accumulates the time the compute thread spent loading."""

    def __init__(
        self,
        sources: Sequence[LayeredKV],
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        lookahead: int = 2,
    ) -> None:
        for s in sources:
            if s.num_layers != num_layers:
                raise ValueError(f"cached KV has {s.num_layers} layers but the model has {num_layers}")
        self.sources = list(sources)
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_rows = sum(s.num_tokens for s in self.sources)
        self.seconds = 0.0
        self.lookahead = lookahead
        self._prefetchers = [s.prefetch for s in self.sources if hasattr(s, "prefetch")]

    def _fetch(self, layer: int, non_blocking: bool = False) -> torch.Tensor:
        first = self.sources[0].layer(layer)
        out = torch.empty(2, self.num_rows, *first.shape[2:], dtype=self.dtype, device=self.device)  # [2, Nc, H, D]
        row = 0
        for s in self.sources:
            part = first if row == 0 else s.layer(layer)  # [2, T, H, D]
            if self.device.type == "cuda" and part.device.type == "cpu" and not part.is_pinned():
                part = part.pin_memory()
            out[:, row : row + s.num_tokens].copy_(part, non_blocking=non_blocking)
            row += s.num_tokens
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.device.type == "cuda":
            yield from self._iter_cuda()
            return
        for layer in range(self.num_layers):
            t0 = time.perf_counter()
            self._hint(layer)
            rows = self._fetch(layer)
            self.seconds += time.perf_counter() - t0
            yield rows

    def _hint(self, layer: int) -> None:
        """Ask prefetching sources for `layer` and the `lookahead` layers after it (no-op for layers
        already started)."""
        for ahead in range(layer, min(layer + 1 + self.lookahead, self.num_layers)):
            for prefetch in self._prefetchers:
                prefetch(ahead)

    def _iter_cuda(self) -> Iterator[torch.Tensor]:
        side = torch.cuda.Stream(device=self.device)
        main = torch.cuda.current_stream(self.device)

        def start(layer: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            self._hint(layer)
            with torch.cuda.stream(side):
                rows = self._fetch(layer, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            return rows, done

        pending = start(0)
        for layer in range(self.num_layers):
            rows, done = pending
            if layer + 1 < self.num_layers:
                pending = start(layer + 1)  # overlaps with this layer's compute
            t0 = time.perf_counter()
            main.wait_event(done)
            rows.record_stream(main)
            self.seconds += time.perf_counter() - t0
            yield rows
