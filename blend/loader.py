"""Lazy per-layer loading of cached chunk KV for the blend loop.

Iterating a `LayerLoader` yields, layer by layer, every source's rows concatenated in plan order
([2, N_cached, H_kv, D], compute dtype, compute device). On CUDA the next layer is copied on a side
stream while the current layer computes: K and V are copied separately (each contiguous: a stored
ChunkKV's `kv[:, layer]` is not), host rows that are not pinned go through two reused pinned staging
buffers, and the compute stream waits on an event (no host synchronization); on CPU loading is inline. Either
way, every source is asked to `prefetch(layer)` the next `lookahead` layers first (entries of a CPU-bound
codec with a DecodePool start them in worker processes while this layer computes; a no-op for others).
The optional abilities are `LayeredKV`'s methods with no-op defaults (chunk_cache/kv.py).

Sources whose `device_task(layer, dtype)` gives a task (entries of a codec that decodes on the device: int8, fp8,
packed) are not decoded on the host: on CUDA their *encoded* sections of the layer go, 16-byte aligned, into
one pinned buffer, cross in one copy on the side stream, and each codec's `device_layer` decodes its rows
there, on the side stream too, so both overlap the previous layer's compute (`device_decode=True` runs the
same path on CPU tensors, which is how the tests check it). Sources offering `section_nbytes(layer)` and
`read_device_task(layer, dtype, into)` (disk entries read layer by layer, `storage.layered.FileLayers`) read
their section from the file straight into that buffer and check its CRC32 there; one that fails (None: the
source recomputed its chunk, blend/recover.py) is read as host rows instead.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..chunk_cache import LayeredKV
from ..compression import LayerTask

_ALIGN = 16  # byte alignment of each section in the device copy (codecs view sections as fp16 / fp32)
_TABLE_BYTES = 128  # room per entry for a codec's `rows_meta` table (packed: 96 bytes, int8: 24)


class LayerLoader:
    """Yields cached rows per layer; `seconds` accumulates the time the compute thread spent loading."""

    def __init__(
        self,
        sources: Sequence[LayeredKV],
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        lookahead: int = 2,
        device_decode: bool | None = None,
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
        self._stored = [s.stored() for s in self.sources]
        self._on_device = self.device.type == "cuda" if device_decode is None else device_decode
        self.device_bytes = 0  # encoded bytes copied to the device and decoded there
        self.file_bytes = 0  # of which read from payload files straight into the loader's buffer
        self._staging: list[torch.Tensor | None] = [None, None]  # pinned KV rows, per slot (CUDA only)
        self._byte_staging: list[torch.Tensor | None] = [None, None]  # pinned encoded sections, per slot

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
        encoded: list[tuple[int, slice, int, LayerTask | None]] = []  # decoded on the device from their bytes
        for i, s in enumerate(self.sources):
            rows = slice(row, row + s.num_tokens)
            row += s.num_tokens
            nbytes = s.section_nbytes(layer) if self._on_device else None
            if nbytes is not None:  # read from its file into the shared buffer below
                encoded.append((i, rows, nbytes, None))
                continue
            task = s.device_task(layer, self.dtype) if self._on_device else None
            if task is not None:
                encoded.append((i, rows, len(task.section), task))
            else:
                out = self._copy_rows(i, layer, rows, out, slot, non_blocking)
        if encoded:
            out, failed = self._decode_on_device(layer, encoded, out, slot, non_blocking)
            for i, rows in failed:  # recomputed since (blend/recover.py): host rows now
                out = self._copy_rows(i, layer, rows, out, slot, non_blocking)
        assert out is not None, "a loader needs at least one source"
        return out

    def _rows(self, head_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(2, self.num_rows, *head_shape, dtype=self.dtype, device=self.device)

    def _copy_rows(
        self, i: int, layer: int, rows: slice, out: torch.Tensor | None, slot: int | None, non_blocking: bool
    ) -> torch.Tensor:
        """Source `i`'s K and V of `layer` into `out[:, rows]` (allocated here when None), through the pinned
        staging buffer `slot` for host rows on CUDA; returns `out`."""
        k, v = self._read(i, layer)
        out = self._rows(k.shape[1:]) if out is None else out
        for half, part in enumerate((k, v)):
            if slot is not None and part.device.type == "cpu" and not part.is_pinned():
                if self._staging[slot] is None:
                    self._staging[slot] = _STAGING.take(tuple(out.shape), self.dtype)
                staged = self._staging[slot][half, rows]
                part = staged.copy_(part)  # host copy (and cast) into pinned memory
            out[half, rows].copy_(part, non_blocking=non_blocking)
        return out

    def _decode_on_device(
        self,
        layer: int,
        encoded: list[tuple[int, slice, int, LayerTask | None]],
        out: torch.Tensor | None,
        slot: int | None,
        non_blocking: bool,
    ) -> tuple[torch.Tensor | None, list[tuple[int, slice]]]:
        """One layer's encoded sections, and each codec's table for `device_rows`, go into one (pinned, on
        CUDA) host buffer, cross in one copy, and each codec decodes all its rows of `out` there (packed, int8:
        one kernel launch for every entry). Sections of file-backed sources are read straight into the
        buffer and checked there; returns `out` and the (source, rows) that failed, to read as host rows."""
        offsets, total = [], 0
        for _, _, nbytes, _ in encoded:
            offsets.append(total)
            total += _aligned(nbytes)
        end = total
        total += (_TABLE_BYTES + _ALIGN) * len(encoded)  # room for the codecs' tables
        if slot is None:
            host = torch.empty(total, dtype=torch.uint8)
        else:
            buf = self._byte_staging[slot]
            if buf is None or buf.numel() < total:
                _STAGING.give_back([buf])
                buf = self._byte_staging[slot] = _STAGING.take((total,), torch.uint8)
            host = buf[:total]
        flat = host.numpy()
        tasks: list[LayerTask] = []
        rows: list[int] = []
        at_of: list[int] = []
        failed: list[tuple[int, slice]] = []
        with warnings.catch_warnings():  # read-only views of the entries' bytes: only read here
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for (i, span, nbytes, task), at in zip(encoded, offsets):
                if task is None:  # straight from the file into the (pinned) buffer, CRC32 checked there
                    task = self.sources[i].read_device_task(layer, self.dtype, memoryview(flat[at : at + nbytes]))
                    if task is None:
                        failed.append((i, span))
                        continue
                    self.file_bytes += nbytes
                else:  # torch copies large spans with all intra-op threads
                    host[at : at + nbytes].copy_(torch.frombuffer(task.section, dtype=torch.uint8))
                tasks.append(task)
                rows.append(span.start)
                at_of.append(at)
        if not tasks:
            return out, failed
        out = self._rows(tasks[0].shape[1:]) if out is None else out
        by_codec: dict[str, list[int]] = {}
        for k, task in enumerate(tasks):
            by_codec.setdefault(task.codec.name, []).append(k)
        tables: dict[str, tuple[int, np.ndarray]] = {}
        for name, members in by_codec.items():
            table = tasks[members[0]].codec.rows_meta(
                [tasks[k] for k in members], [at_of[k] for k in members], [rows[k] for k in members]
            )
            if table is not None:
                if end + table.nbytes > total:
                    raise RuntimeError(f"{name}'s rows_meta table is over {_TABLE_BYTES} bytes per entry")
                flat[end : end + table.nbytes] = table.view(np.uint8).reshape(-1)
                tables[name] = (end, table)
                end += _aligned(table.nbytes)
        on_device = host[:end].to(self.device, non_blocking=non_blocking)  # [bytes] uint8
        for name, members in by_codec.items():
            meta = None
            if name in tables:
                at, table = tables[name]
                meta = on_device[at : at + table.nbytes].view(torch.int64).view(table.shape)
            tasks[members[0]].codec.device_rows(
                [tasks[k] for k in members],
                on_device,
                [at_of[k] for k in members],
                out,
                [rows[k] for k in members],
                meta,
            )
        self.device_bytes += end
        return out, failed

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
            for source in self.sources:
                source.prefetch(ahead)

    def _iter_cuda(self) -> Iterator[torch.Tensor]:
        side = torch.cuda.Stream(device=self.device)
        main = torch.cuda.current_stream(self.device)
        side.wait_stream(main)  # sources written on the compute stream (a fresh precompute) are complete
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
            _STAGING.give_back(self._staging + self._byte_staging)
            self._staging, self._byte_staging = [None, None], [None, None]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


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
            if buf is not None:  # by identity: list.remove would compare tensors element-wise
                self._free = [b for b in self._free if b is not buf]
        if buf is None:
            with torch.inference_mode(False):  # a normal tensor: reusable inside and outside inference mode
                buf = torch.empty(numel, dtype=dtype, pin_memory=True)
        return buf[:numel].view(shape)

    def give_back(self, buffers: Sequence[torch.Tensor | None]) -> None:
        with self._lock:
            for b in buffers:
                if b is not None:
                    self._free.append(b._base if b._base is not None else b)
            self._free = sorted(self._free, key=torch.Tensor.numel)[-4:]  # keep the largest few


_STAGING = _PinnedBuffers()
