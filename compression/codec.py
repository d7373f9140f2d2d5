"""The `Codec` interface: chunk KV <-> bytes, with per-layer decoding so loading can be lazy.

An `EncodedKV` is an opaque payload plus JSON-able metadata (shape, dtype, pos0, codec name and the
codec's own parameters, e.g. per-layer byte offsets). Codecs are stateless and chosen by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..chunk_cache import ChunkKV


@dataclass(frozen=True)
class EncodedKV:
    """A chunk's KV as bytes; `meta` is JSON-serialisable and enough to decode `payload`."""

    codec: str
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class Codec(ABC):
    """Encode ChunkKV to bytes and back."""

    name: str
    lossless: bool
    parallel_decode: bool = False  # decoding is CPU-bound work holding the GIL: worth a DecodePool process
    device_decode: bool = False  # decodes from its bytes where they are (a GPU): `device_layer` runs there
    encodes_on_device: bool = False  # encodes KV where it is (a GPU) and moves only the bytes to the host

    @abstractmethod
    def encode(self, kv: ChunkKV) -> EncodedKV:
        """Bytes and metadata for `kv`."""

    @abstractmethod
    def decode(self, enc: EncodedKV, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> ChunkKV:
        """The whole ChunkKV on `device` (in the stored dtype unless `dtype` is given)."""

    def decode_layer(
        self, enc: EncodedKV, layer: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One layer [2, T, H_kv, D]; codecs with a per-layer layout override this to skip the rest."""
        return self.decode(enc, device, dtype).layer(layer)
