"""ChunkKV: the one KV layout of a cached chunk, and the `LayeredKV` protocol readers accept.

`kv[2, num_layers, num_tokens, num_kv_heads, head_dim]` (K then V, keys already RoPE-rotated at
positions `pos0 .. pos0 + num_tokens - 1`). Token-major, so slicing and concatenation are on dim 2.
Anything with `pos0`, `num_tokens`, `num_layers` and `layer(l)` (e.g. a lazily decoded entry) can be
fed to the blend loop in place of a ChunkKV; a class that subclasses `LayeredKV` also gets its optional
abilities (`prefetch`, `device_task`, `stored`) as no-op defaults, and overrides the ones it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LayeredKV(Protocol):
    """A chunk's KV readable one layer at a time (what the blend loop consumes). The optional abilities
    below default to "not offered"; the layer loader (blend/loader.py) calls them on every source."""

    pos0: int
    num_tokens: int  # an attribute or a read-only property
    num_layers: int

    def layer(self, index: int) -> torch.Tensor:
        """KV of one layer: [2, num_tokens, num_kv_heads, head_dim]."""
        ...

    def prefetch(self, index: int) -> None:
        """A hint that layer `index` is read soon (storage's encoded entries start decoding it in a
        worker process); by default nothing to do."""

    def device_task(self, index: int, dtype: torch.dtype) -> Any:
        """Layer `index` as a `compression.LayerTask` whose encoded bytes the loader decodes on the
        device, or None (the default): the loader reads `layer(index)`."""
        return None

    def stored(self) -> ChunkKV | None:
        """The ChunkKV whose tensor holds these layers, when there is one (so K and V can be copied
        separately and contiguously); None by default."""
        return None

    def section_nbytes(self, index: int) -> int | None:
        """Bytes of layer `index`'s encoded section when the loader should read it straight into its
        own buffer (`read_device_task`) and decode it on the device; None (the default): not offered."""
        return None

    def read_device_task(self, index: int, dtype: torch.dtype, into: memoryview) -> Any:
        """Read layer `index`'s section into `into` and return its device task (offered only by sources
        whose `section_nbytes` is not None)."""
        raise NotImplementedError(f"{type(self).__name__} offers no section reads")


@dataclass(frozen=True, eq=False)
class ChunkKV(LayeredKV):
    """A chunk's KV for every layer, with the position its keys were rotated at."""

    kv: torch.Tensor  # [2, L, T, H_kv, D]
    pos0: int

    def __post_init__(self) -> None:
        if self.kv.ndim != 5 or self.kv.shape[0] != 2:
            raise ValueError(
                f"ChunkKV.kv must have shape [2, layers, tokens, kv_heads, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.kv.shape[2] == 0:
            raise ValueError("ChunkKV needs at least one token")
        if self.pos0 < 0:
            raise ValueError(f"pos0 must be >= 0, got {self.pos0}")

    @property
    def num_layers(self) -> int:
        return self.kv.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.kv.shape[3]

    @property
    def head_dim(self) -> int:
        return self.kv.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, index: int) -> torch.Tensor:
        return self.kv[:, index]  # [2, T, H_kv, D]

    def stored(self) -> ChunkKV:
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ChunkKV:
        return ChunkKV(self.kv.to(device=device, dtype=dtype), self.pos0)

    def tokens(self, start: int, end: int) -> ChunkKV:
        """Rows [start, end) of the chunk (keys keep their rotation: pos0 moves with them)."""
        return ChunkKV(self.kv[:, :, start:end], self.pos0 + start)
