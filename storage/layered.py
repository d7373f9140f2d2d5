"""Lazy `LayeredKV` views that tiers return: one layer is moved or decoded only when it is read.

`ResidentKV` wraps a ChunkKV already in memory (moved to the target device per layer);
`EncodedLayers` wraps an encoded payload (decoded per layer by its codec; with a `DecodePool`,
`prefetch(i)` starts layer i in a worker process so it is ready when the blend loop reads it; with a
codec that decodes on the device, `device_task(i)` hands the loader the layer's bytes to decode there).
`materialize` turns any LayeredKV back into a whole ChunkKV (used when entries move between tiers).
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from ..chunk_cache import ChunkKV, LayeredKV
from ..compression import Codec, DecodePool, DecodePoolError, EncodedKV, LayeredCodec, LayerTask


class ResidentKV(LayeredKV):
    """A stored ChunkKV read on another device, one layer at a time."""

    def __init__(self, chunk: ChunkKV, device: torch.device) -> None:
        self.chunk = chunk
        self.pos0 = chunk.pos0
        self.device = device

    @property
    def num_tokens(self) -> int:
        return self.chunk.num_tokens

    @property
    def num_layers(self) -> int:
        return self.chunk.num_layers

    def layer(self, index: int) -> torch.Tensor:
        """KV of one layer on the target device: [2, T, H_kv, D]."""
        return self.chunk.layer(index).to(self.device, non_blocking=True)  # [2, T, H, D]

    def stored(self) -> ChunkKV:
        return self.chunk


class EncodedLayers(LayeredKV):
    """An encoded payload decoded layer by layer on `device` (the bytes are already verified)."""

    def __init__(
        self,
        enc: EncodedKV,
        codec: Codec,
        pos0: int,
        num_tokens: int,
        num_layers: int,
        device: torch.device,
        pool: DecodePool | None = None,
    ) -> None:
        self.enc = enc
        self.codec = codec
        self.pos0 = pos0
        self._num_tokens = num_tokens
        self._num_layers = num_layers
        self.device = device
        self.pool = pool if pool is not None and codec.parallel_decode else None
        self._pending: dict[int, Future] = {}  # layer -> its decode in a pool worker

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def prefetch(self, index: int) -> None:
        """Start decoding layer `index` in a pool worker (no-op without a pool, or when already started)."""
        if self.pool is None or index in self._pending or not 0 <= index < self._num_layers:
            return
        try:
            self._pending[index] = self.pool.submit(self.codec.layer_task(self.enc, index))
        except DecodePoolError:
            pass  # the pool is closed or broken: `layer` decodes inline

    def device_task(self, index: int, dtype: torch.dtype) -> LayerTask | None:
        """Layer `index` as a task to decode where its bytes will be copied (the loader's GPU path), or
        None when this codec decodes only on the host. The bytes were verified when the tier read them,
        so the CRC is not computed again."""
        if not self.codec.device_decode or not isinstance(self.codec, LayeredCodec):
            return None
        if not 0 <= index < self._num_layers:
            raise IndexError(f"layer {index} out of range for a chunk of {self._num_layers} layers")
        return self.codec.layer_task(self.enc, index, dtype, verify=False)

    def layer(self, index: int) -> torch.Tensor:
        """KV of one layer decoded on the target device: [2, T, H_kv, D]."""
        if not 0 <= index < self._num_layers:
            raise IndexError(f"layer {index} out of range for a chunk of {self._num_layers} layers")
        pending = self._pending.pop(index, None)
        if pending is not None:
            try:
                return pending.result().to(self.device)  # [2, T, H, D]
            except DecodePoolError:
                pass  # a worker died under it: decode here
        return self.codec.decode_layer(self.enc, index, device=self.device)  # [2, T, H, D]


def materialize(kv: LayeredKV, device: torch.device | str | None = None) -> ChunkKV:
    """All layers of `kv` as one ChunkKV (on `device`, else where the layers are)."""
    if isinstance(kv, ChunkKV):
        return kv if device is None else kv.to(device)
    if isinstance(kv, ResidentKV):
        return kv.chunk if device is None else kv.chunk.to(device)
    if isinstance(kv, EncodedLayers):
        target = device or kv.device
        whole = kv.pool.decode(kv.codec, kv.enc, target) if kv.pool is not None else kv.codec.decode(kv.enc, target)
        return ChunkKV(whole.kv, kv.pos0)
    layers = [kv.layer(i) for i in range(kv.num_layers)]
    return ChunkKV(torch.stack(layers, dim=1).to(device), kv.pos0)  # [2, L, T, H, D]
