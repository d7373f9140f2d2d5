"""Lazy per-layer loading of cached chunk KV for the blend loop.

Iterating a `LayerLoader` yields, layer by layer, every source's rows concatenated in plan order
([2, N_cached, H_kv, D], compute dtype, compute device). On CUDA the next layer is copied on a side
stream while the current layer computes: K and V are copied separately (each contiguous: a stored
ChunkKV's `kv[:, layer]` is not), host rows that are not pinned go through two reused pinned staging
buffers, and the compute stream waits on an event (no host synchronization); on CPU loading is inline. Either
way, sources offering `prefetch(layer)` (entries of a CPU-bound codec with a DecodePool) are asked
for the next `lookahead` layers first, so worker processes decode them while this layer computes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from ..chunk_cache import ChunkKV, LayeredKV


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
        self._stored = [_stored_chunk(s) for s in self.sources]

    def _read(self, index: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [T, H, D] of source `index` at `layer`, each contiguous (copied at full speed)."""
        chunk = self._stored[index]
        if chunk is not None:  # read the stored tensor itself, not a token-major [2, T, H, D] slice of it
            return chunk.kv[0, layer], chunk.kv[1, layer]
        part = self.sources[index].layer(layer)  # [2, T, H, D]
        return part[0], part[1]

    def _fetch(self, layer: int, slot: int | None = None, non_blocking: bool = False) -> torch.Tensor:
        """[2, Nc, H, D] on the device. On CUDA, host rows that are not pinned go through the pinned
        staging buffer `slot` (reused), so every host-to-device copy is asynchronous and contiguous."""
        out: torch.Tensor | None = None
        row = 0
        for i, s in enumerate(self.sources):
            k, v = self._read(i, layer)
            if out is None:
                out = torch.empty(2, self.num_rows, *k.shape[1:], dtype=self.dtype, device=self.device)
            rows = slice(row, row + s.num_tokens)
            for half, part in enumerate((k, v)):
                if slot is not None and part.device.type == "cpu" and not part.is_pinned():
                    if self._staging[slot] is None:
                        self._staging[slot] = _STAGING.take((2, self.num_rows, *k.shape[1:]), self.dtype)
                    staged = self._staging[slot][half, rows]
                    part = staged.copy_(part)  # host copy (and cast) into pinned memory
                out[half, rows].copy_(part, non_blocking=non_blocking)
            row += s.num_tokens
        assert out is not None, "a loader needs at least one source"
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
        side.wait_stream(main)  # sources written on the compute stream (a fresh precompute) are complete
        self._staging: list[torch.Tensor | None] = [None, None]  # taken when a layer first needs one
        copied: list[torch.cuda.Event | None] = [None, None]  # when each staging buffer's last copy finished

        def start(layer: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            self._hint(layer)
            slot = layer % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the copy from this buffer two layers ago is done (long since)
            with torch.cuda.stream(side):
                rows = self._fetch(layer, slot, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            copied[slot] = done
            return rows, done

        try:
            pending = start(0)
            for layer in range(self.num_layers):
                rows, done = pending
                if layer + 1 < self.num_layers:
                    pending = start(layer + 1)  # overlaps with this layer's compute
                t0 = time.perf_counter()
                main.wait_event(done)  # the device waits; the host does not
                rows.record_stream(main)
                self.seconds += time.perf_counter() - t0
                yield rows
        finally:
            for event in copied:
                if event is not None:
                    event.synchronize()
            _STAGING.give_back(self._staging)


def _stored_chunk(source: LayeredKV) -> ChunkKV | None:
    """The ChunkKV behind a source when its layers are slices of one stored tensor (a ChunkKV, or a
    memory tier's resident view `.chunk`), so K and V can be copied separately and contiguously."""
    if isinstance(source, ChunkKV):
        return source
    chunk = getattr(source, "chunk", None)
    return chunk if isinstance(chunk, ChunkKV) else None


class _PinnedBuffers:
    """Pinned host buffers reused across layers and requests (pinning memory per layer is slow)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned buffer viewed as `shape` (a free one large enough, else a new one)."""
        numel = math.prod(shape)
        with self._lock:
            fits = [b for b in self._free if b.dtype == dtype and b.numel() >= numel]
            buf = min(fits, key=torch.Tensor.numel) if fits else None
            if buf is not None:
                self._free.remove(buf)
        if buf is None:
            buf = torch.empty(numel, dtype=dtype, pin_memory=True)
        return buf[:numel].view(shape)

    def give_back(self, buffers: Sequence[torch.Tensor | None]) -> None:
        with self._lock:
            for b in buffers:
                if b is not None:
                    self._free.append(b._base if b._base is not None else b)
            self._free = sorted(self._free, key=torch.Tensor.numel)[-4:]  # keep the largest few


_STAGING = _PinnedBuffers()
