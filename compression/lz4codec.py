"""lz4: lossless LZ4 block compression over any other codec's per-layer sections (`lz4+int8` ...).

Each layer's section of the inner codec is compressed on its own, so per-layer decoding stays lazy.
"""

from __future__ import annotations

from typing import Any

import lz4.block
import torch

from .identity import IdentityCodec
from .layered import LayeredCodec


class Lz4Codec(LayeredCodec):
    """LZ4 over `inner`'s bytes; lossless exactly when `inner` is."""

    def __init__(self, inner: LayeredCodec | None = None) -> None:
        inner = inner or IdentityCodec()
        if isinstance(inner, Lz4Codec):
            raise ValueError("lz4 over lz4 gains nothing; compose lz4 with one of the other codecs")
        self.inner = inner
        self.name = "lz4" if isinstance(inner, IdentityCodec) else f"lz4+{inner.name}"
        self.lossless = inner.lossless
        self.parallel_decode = inner.parallel_decode

    @property
    def rel_error(self) -> float:
        """The inner codec's stated error bound (lz4 adds none)."""
        return getattr(self.inner, "rel_error", 0.0)

    def params(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "inner_params": self.inner.params()}

    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        return lz4.block.compress(self.inner.encode_layer(layer_kv, layer, num_layers), store_size=True)

    def decode_section(self, section, params, shape, stored, layer, num_layers, device) -> torch.Tensor:
        if params.get("inner") != self.inner.name:
            raise ValueError(f"entry wraps {params.get('inner')!r}, this lz4 codec wraps {self.inner.name!r}")
        raw = lz4.block.decompress(section)
        return self.inner.decode_section(raw, params["inner_params"], shape, stored, layer, num_layers, device)
