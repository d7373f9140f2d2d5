"""Recompute a chunk whose stored layer turns out damaged in the middle of a blend.

A disk entry read layer by layer (`storage.layered.FileLayers`) checks each layer's CRC32 only when the
layer is read, so damage can surface after layer 0 has run. `Recovering` wraps such a source: the first
`CodecError` it sees (the tier has already dropped the entry, so it is never served again and the next
request recomputes and stores it) makes it compute the chunk's KV from its token ids with the model, as
a miss would be, and serve every later layer from that. The recomputed keys are moved to the damaged
entry's `pos0` (so the blend's re-rotation, computed once per request, stays right).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..chunk_cache import ChunkKV, LayeredKV, precompute
from ..compression import CodecError, LayerTask
from .rerotate import rerotate, rotation

log = logging.getLogger(__name__)


class Recovering(LayeredKV):
    """A LayeredKV that falls back to `recompute()` (the chunk's KV, any pos0) when `inner` fails to read."""

    def __init__(self, inner: LayeredKV, recompute: Callable[[], ChunkKV], inv_freq: torch.Tensor) -> None:
        self.inner = inner
        self.pos0 = inner.pos0
        self._recompute = recompute
        self._inv_freq = inv_freq
        self.recomputed: ChunkKV | None = None  # set once the stored entry failed

    @property
    def num_tokens(self) -> int:
        return self.inner.num_tokens

    @property
    def num_layers(self) -> int:
        return self.inner.num_layers

    def _fall_back(self, err: Exception) -> ChunkKV:
        if self.recomputed is None:
            log.warning("recomputing a chunk whose stored KV failed mid-blend: %s", err)
            kv = self._recompute()
            if kv.num_tokens != self.num_tokens or kv.num_layers != self.num_layers:
                raise ValueError(f"recomputed chunk has shape {tuple(kv.kv.shape)}, the stored one differs") from err
            if kv.pos0 != self.pos0:  # keys as if computed from the stored entry's pos0
                cos, sin = rotation(torch.full((kv.num_tokens,), self.pos0 - kv.pos0), self._inv_freq)
                keys = kv.kv[0]  # [L, T, H, D]
                cos, sin = cos.to(keys.device), sin.to(keys.device)
                moved = torch.stack([rerotate(layer_keys, cos, sin) for layer_keys in keys])  # [L, T, H, D] fp32
                kv = ChunkKV(torch.stack([moved.to(kv.dtype), kv.kv[1]]), self.pos0)
            self.recomputed = kv
        return self.recomputed

    def layer(self, index: int) -> torch.Tensor:
        if self.recomputed is None:
            try:
                return self.inner.layer(index)
            except CodecError as err:
                self._fall_back(err)
        return self.recomputed.layer(index)

    def prefetch(self, index: int) -> None:
        if self.recomputed is None:
            self.inner.prefetch(index)

    def device_task(self, index: int, dtype: torch.dtype) -> LayerTask | None:
        """The inner source's device task; None (read `layer` instead) once it has failed."""
        if self.recomputed is not None:
            return None
        try:
            return self.inner.device_task(index, dtype)
        except CodecError as err:
            self._fall_back(err)
            return None

    def section_nbytes(self, index: int) -> int | None:
        return None if self.recomputed is not None else self.inner.section_nbytes(index)

    def read_device_task(self, index: int, dtype: torch.dtype, into: memoryview) -> LayerTask | None:
        """The section read into `into` and checked (see `FileLayers`); None once the stored entry failed."""
        try:
            return self.inner.read_device_task(index, dtype, into)
        except CodecError as err:
            self._fall_back(err)
            return None


def recovering(model, plan, sources):
    """`sources` (target start row, KV) with every source that can fail on read (not already in memory)
    wrapped in `Recovering`, its fallback the chunk's precompute from the plan's token ids, after the
    plan's own prefix (exact for the first chunk, and KV that saw this prompt's instruction for the rest)."""
    prefix = list(plan.prefix_ids)
    out = []
    for start, kv in sources:
        if kv.stored() is not None or isinstance(kv, Recovering):  # resident: nothing to fail on read
            out.append((start, kv))
            continue
        ids = plan.input_ids[start : start + kv.num_tokens].tolist()
        out.append((start, Recovering(kv, lambda ids=ids: precompute(model, ids, prefix or None), model.inv_freq)))
    return out
