"""LayeredCodec: the shared per-layer framing every concrete codec builds on.

A payload is one section per layer, back to back; `meta` holds the shape, stored dtype, pos0, the
section offsets, a CRC32 per section and the codec's own parameters. `decode_layer` touches only its
layer's bytes, and a truncated or corrupted section raises `CodecError`, never returns garbage.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..chunk_cache import ChunkKV
from .codec import Codec, EncodedKV
from .names import DTYPE_NAMES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
_META_KEYS = ("shape", "dtype", "pos0", "offsets", "crc", "params")


class CodecError(ValueError):
    """An encoded entry that cannot be decoded: wrong codec, malformed metadata, truncated or corrupt bytes."""


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float16` -> "float16"; dtypes no codec stores fail listing the accepted ones."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"codecs store {', '.join(DTYPES)} chunk KV; got {name}")
    return name


@dataclass(frozen=True)
class LayerTask:
    """One layer of one entry to decode: the codec, the layer's verified section and what shapes it.
    A `DecodePool` ships it to a worker process (the section raw, the rest pickled); `run` decodes it
    to [2, T, H, D]."""

    codec: LayeredCodec
    section: bytes | bytearray | memoryview
    params: dict[str, Any]
    shape: tuple[int, int, int]  # (T, H, D)
    stored: torch.dtype
    layer: int
    num_layers: int
    dtype: torch.dtype  # the result's dtype

    def run(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The layer [2, T, H, D] on `device` in `dtype`; a section that does not parse raises CodecError."""
        name = self.codec.name
        try:
            out = self.codec.decode_section(
                self.section, self.params, self.shape, self.stored, self.layer, self.num_layers, device
            )
        except CodecError:
            raise
        except Exception as err:  # a section that passed its CRC but does not parse: say so, never guess
            raise CodecError(f"{name} entry: layer {self.layer} does not decode: {err}") from err
        if tuple(out.shape) != (2, *self.shape):
            raise CodecError(
                f"{name} entry: layer {self.layer} decoded to {tuple(out.shape)}, expected {(2, *self.shape)}"
            )
        return out.to(dtype=self.dtype)

    def section_tensor(self, pin: bool = False) -> torch.Tensor:
        """A copy of the section as a 1-D uint8 CPU tensor (in pinned memory with `pin`, ready for a
        non-blocking copy to the GPU and `codec.device_layer(task, that copy)`)."""
        host = torch.from_numpy(np.frombuffer(self.section, dtype=np.uint8).copy())  # [bytes]
        return host.pin_memory() if pin else host


class LayeredCodec(Codec):
    """A codec whose payload is one independently decodable, checksummed section per layer."""

    def params(self) -> dict[str, Any]:
        """JSON-able parameters decoding needs (stored in `meta["params"]`); none by default."""
        return {}

    @abstractmethod
    def encode_layer(self, layer_kv: torch.Tensor, layer: int, num_layers: int) -> bytes:
        """Bytes of one layer [2, T, H, D] (on CPU, in the stored dtype)."""

    @abstractmethod
    def decode_section(
        self,
        section: bytes,
        params: dict[str, Any],
        shape: tuple[int, int, int],
        stored: torch.dtype,
        layer: int,
        num_layers: int,
        device: torch.device | str,
    ) -> torch.Tensor:
        """One layer [2, T, H, D] on `device` from its section; `shape` is (T, H, D)."""

    def device_layer(self, task: LayerTask, section: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`task`'s layer [2, T, H, D] in `task.dtype` on the device `section` is on, from `section`:
        the layer's CRC-checked bytes (`task.section`) as a 1-D uint8 tensor already there (the loader
        moves the *encoded* bytes). Writes into `out` when given. This default reads the bytes back to
        the host and decodes there; codecs that decode on the device (int8, fp8, packed) override it."""
        if section.dtype != torch.uint8 or section.dim() != 1:
            raise ValueError(f"section must be a 1-D uint8 tensor, got {section.dtype} of shape {tuple(section.shape)}")
        host = replace(task, section=section.cpu().numpy().tobytes())
        result = host.run(section.device)
        return result if out is None else out.copy_(result)

    def rows_meta(self, tasks: Sequence[LayerTask], offsets: Sequence[int], rows: Sequence[int]) -> np.ndarray | None:
        """Host-side table (int64) that `device_rows` reads on the device, so the loader can ship it in the
        same copy as the sections; None when this codec needs none (the default)."""
        return None

    def device_rows(
        self,
        tasks: Sequence[LayerTask],
        src: torch.Tensor,
        offsets: Sequence[int],
        out: torch.Tensor,
        rows: Sequence[int],
        meta: torch.Tensor | None = None,
    ) -> None:
        """Decode several entries' sections of one layer, at byte `offsets` of `src` (1-D uint8 on the device,
        offsets multiples of 16), into `out` [2, N, H, D] from row `rows[j]` on; `meta` is `rows_meta`'s
        table on the device. This default decodes entry by entry with `device_layer`; packed overrides it
        with one kernel launch for all of them."""
        for task, at, row in zip(tasks, offsets, rows):
            out[:, row : row + task.shape[0]].copy_(self.device_layer(task, src[at : at + len(task.section)]))

    # -- the Codec interface ------------------------------------------------------------------------
    def encode(self, kv: ChunkKV) -> EncodedKV:
        dtype_name(kv.dtype)
        x = kv.kv.detach() if self.encodes_on_device else kv.kv.detach().cpu()  # [2, L, T, H, D]
        layers = range(kv.num_layers)
        return self.framed(kv, [self.encode_layer(x[:, i].contiguous(), i, kv.num_layers) for i in layers])

    def framed(self, kv: ChunkKV, sections: Sequence[bytes]) -> EncodedKV:
        """The entry of `kv` whose layers encoded to `sections`: the payload and its framing (offsets, CRC32s)."""
        offsets = [0]
        for s in sections:
            offsets.append(offsets[-1] + len(s))
        meta = {
            "shape": list(kv.kv.shape),
            "dtype": dtype_name(kv.dtype),
            "pos0": kv.pos0,
            "offsets": offsets,
            "crc": [zlib.crc32(s) for s in sections],
            "params": self.params(),
        }
        return EncodedKV(self.name, b"".join(sections), meta)

    def decode(self, enc: EncodedKV, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> ChunkKV:
        shape, stored = self._check(enc)
        out = torch.empty(shape, dtype=dtype or stored, device=device)  # [2, L, T, H, D]
        for i in range(shape[1]):
            out[:, i] = self.decode_layer(enc, i, device, dtype)
        return ChunkKV(out, int(enc.meta["pos0"]))

    def decode_layer(
        self, enc: EncodedKV, layer: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return self.layer_task(enc, layer, dtype).run(device)

    def layer_task(
        self, enc: EncodedKV, layer: int, dtype: torch.dtype | None = None, verify: bool = True
    ) -> LayerTask:
        """Everything decoding one layer needs (its CRC-checked bytes, shape, params), apart from the
        rest of the payload: a task that runs here or in a `DecodePool` worker process. `verify=False`
        skips the CRC for bytes a tier already verified on read (the GPU path: one pass over them less)."""
        shape, stored = self._check(enc)
        num_layers = shape[1]
        if not 0 <= layer < num_layers:
            raise IndexError(f"layer {layer} out of range: this entry has layers 0..{num_layers - 1}")
        start, end = enc.meta["offsets"][layer], enc.meta["offsets"][layer + 1]
        section = memoryview(enc.payload)[start:end]  # no copy: decoded here, or written to a worker's pipe
        if verify and zlib.crc32(section) != enc.meta["crc"][layer]:
            raise CodecError(f"{self.name} entry: layer {layer} fails its CRC32 check (corrupted payload)")
        return LayerTask(
            self,
            section,
            enc.meta["params"],
            (shape[2], shape[3], shape[4]),
            stored,
            layer,
            num_layers,
            dtype or stored,
        )

    # -- validation -----------------------------------------------------------------------------------
    def _check(self, enc: EncodedKV) -> tuple[list[int], torch.dtype]:
        """Shape and stored dtype of `enc`, after checking it is ours and its framing is whole."""
        if enc.codec != self.name:
            raise CodecError(f"entry was encoded by {enc.codec!r}; this codec decodes only {self.name!r}")
        meta = enc.meta
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise CodecError(f"{self.name} entry: meta lacks {', '.join(missing)}")
        shape = [int(s) for s in meta["shape"]]
        if len(shape) != 5 or shape[0] != 2 or min(shape) < 1:
            raise CodecError(f"{self.name} entry: bad shape {shape}; expected [2, L, T, H, D], all >= 1")
        if meta["dtype"] not in DTYPES:
            raise CodecError(f"{self.name} entry: stored dtype {meta['dtype']!r}; accepted: {', '.join(DTYPES)}")
        offsets = meta["offsets"]
        if len(offsets) != shape[1] + 1 or len(meta["crc"]) != shape[1]:
            raise CodecError(
                f"{self.name} entry: {len(offsets)} offsets / {len(meta['crc'])} CRCs for {shape[1]} layers"
            )
        if offsets[-1] != len(enc.payload):
            raise CodecError(
                f"{self.name} entry: payload is {len(enc.payload)} bytes, its layers need {offsets[-1]} "
                "(truncated or padded)"
            )
        return shape, DTYPES[meta["dtype"]]
