"""Lazy `LayeredKV` views that tiers return: one layer is moved or decoded only when it is read.

`ResidentKV` wraps a ChunkKV already in memory (moved to the target device per layer);
`EncodedLayers` wraps an encoded payload (decoded per layer by its codec; with a `DecodePool`,
`prefetch(i)` starts layer i in a worker process so it is ready when the blend loop reads it; with a
codec that decodes on the device, `device_task(i)` hands the loader the layer's bytes to decode there).
`FileLayers` is the same over a payload file whose header alone was read: each layer's section is read
from the file when asked (`read_device_task` reads it straight into the caller's buffer, pinned on CUDA)
and its CRC32 checked as it arrives; a bad section calls the tier's `on_damage` (the entry is dropped)
and raises `CodecError`, so the caller recomputes that chunk (blend/recover.py).
`materialize` turns any LayeredKV back into a whole ChunkKV (used when entries move between tiers).
"""

from __future__ import annotations

import os
import weakref
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import NoReturn

import torch

from ..chunk_cache import ChunkKV, LayeredKV
from ..compression import Codec, CodecError, DecodePool, DecodePoolError, EncodedKV, LayeredCodec, LayerTask
from ..compression.layered import DTYPES


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
        self._enc = enc
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

    @property
    def enc(self) -> EncodedKV:
        """The whole encoded entry."""
        return self._enc

    def prefetch(self, index: int) -> None:
        """Start decoding layer `index` in a pool worker (no-op without a pool, or when already started)."""
        if self.pool is None or index in self._pending or not 0 <= index < self._num_layers:
            return
        try:
            self._pending[index] = self.pool.submit(self._task(index, None, verify=True))
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
        return self._task(index, dtype, verify=False)

    def _task(self, index: int, dtype: torch.dtype | None, verify: bool) -> LayerTask:
        """Layer `index` to decode (its bytes CRC-checked with `verify`)."""
        return self.codec.layer_task(self.enc, index, dtype, verify=verify)

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
        return self._task(index, None, verify=True).run(self.device)  # [2, T, H, D]


class FileLayers(EncodedLayers):
    """An entry of a payload file read layer by layer: `fd` is open on the file (closed with this object),
    the payload starts at `payload_offset`, `meta` has the (already checked) offsets and CRC32s. Nothing is
    read before a layer is asked for; `enc` reads and verifies the whole payload (for `materialize`)."""

    def __init__(
        self,
        fd: int,
        payload_offset: int,
        codec_name: str,
        meta: dict,
        codec: Codec,
        pos0: int,
        num_tokens: int,
        num_layers: int,
        device: torch.device,
        pool: DecodePool | None = None,
        on_damage: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(codec, LayeredCodec):
            raise ValueError(f"per-layer reads need a layered codec, not {codec.name!r}")
        super().__init__(EncodedKV(codec_name, b"", meta), codec, pos0, num_tokens, num_layers, device, pool)
        self._meta = meta
        shape = [int(x) for x in meta["shape"]]
        self._shape = (shape[2], shape[3], shape[4])
        self._stored = DTYPES[meta["dtype"]]
        self._fd = fd
        self._base = payload_offset
        self._whole: EncodedKV | None = None
        self._codec_name = codec_name
        self.on_damage = on_damage
        self.bytes_read = 0  # payload bytes read from the file so far
        weakref.finalize(self, os.close, fd)

    def section_nbytes(self, index: int) -> int | None:
        """Bytes of layer `index`'s section when the loader should read it into its own buffer for a device
        decode (`read_device_task`); None when this codec decodes on the host."""
        if not self.codec.device_decode:
            return None
        offsets = self._meta["offsets"]
        return offsets[index + 1] - offsets[index]

    def read_device_task(self, index: int, dtype: torch.dtype, into: memoryview) -> LayerTask:
        """Read layer `index`'s section into `into` (exactly its bytes), check its CRC32 and return the task
        decoding it; a bad section: `on_damage`, then CodecError."""
        return self._task(index, dtype, verify=True, into=into)

    def _task(self, index: int, dtype: torch.dtype | None, verify: bool, into: memoryview | None = None) -> LayerTask:
        """Layer `index` read from the file (into `into` when given) and CRC-checked whatever `verify` says:
        these bytes were never checked before."""
        if not 0 <= index < self._num_layers:
            raise IndexError(f"layer {index} out of range for a chunk of {self._num_layers} layers")
        meta = self._meta
        start, end = meta["offsets"][index], meta["offsets"][index + 1]
        buf = memoryview(bytearray(end - start)) if into is None else into
        if len(buf) != end - start:
            raise ValueError(f"layer {index} needs a buffer of {end - start} bytes, got {len(buf)}")
        try:
            got = os.preadv(self._fd, [buf], self._base + start) if len(buf) else 0
        except OSError as err:
            self._damaged(f"layer {index} unreadable: {err}")
        self.bytes_read += got
        if got != len(buf):
            self._damaged(f"layer {index} is truncated ({got} of {len(buf)} bytes)")
        if zlib.crc32(buf) != meta["crc"][index]:
            self._damaged(f"layer {index} fails its CRC32 check")
        return LayerTask(
            self.codec, buf, meta["params"], self._shape, self._stored, index, self._num_layers, dtype or self._stored
        )

    def _damaged(self, why: str) -> NoReturn:
        if self.on_damage is not None:
            self.on_damage(why)
        raise CodecError(f"{self.codec.name} entry: {why} (the entry is dropped)")

    @property
    def enc(self) -> EncodedKV:
        """The whole payload, read once and every layer CRC-checked."""
        if self._whole is None:
            meta = self._meta
            size = meta["offsets"][-1]
            buf = bytearray(size)
            got = os.preadv(self._fd, [buf], self._base) if size else 0
            self.bytes_read += got
            whole = EncodedKV(self._codec_name, bytes(buf), meta)
            if got != size:
                self._damaged(f"payload is truncated ({got} of {size} bytes)")
            for i in range(self._num_layers):
                if zlib.crc32(memoryview(whole.payload)[meta["offsets"][i] : meta["offsets"][i + 1]]) != meta["crc"][i]:
                    self._damaged(f"layer {i} fails its CRC32 check")
            self._whole = whole
        return self._whole


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
