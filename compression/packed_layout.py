"""The `packed` codec's parameters and byte layout: `PackedConfig` (bits per band of layers, scale-group
geometry, `params` as stored in each entry) and `PackedLayout` (the offsets of one layer's section,
from the shape and params alone). Shared by the codec (compression/packed.py) and its Triton kernel
(compression/packed_triton.py), which import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMAT = 1
MAX_BITS = 8


@dataclass(frozen=True)
class PackedConfig:
    """Bits per equal band of layers (early first) for K and V, and the scale groups' geometry:
    (tokens, channels) sharing one grid, 0 tokens meaning all the chunk's tokens. Defaults: see
    docs/BENCHMARKS.md ("packed"); a calibrated schedule (`ragkv calibrate`) replaces the bits."""

    key_bits: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    value_bits: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    key_group: tuple[int, int] = (0, 1)  # per channel, over all tokens
    value_group: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if not bits or not all(isinstance(b, int) and 1 <= b <= MAX_BITS for b in bits):
                raise ValueError(f"{name} must be a non-empty tuple of ints in 1..{MAX_BITS}, got {bits}")
        for name in ("key_group", "value_group"):
            group = getattr(self, name)
            if len(group) != 2 or group[0] < 0 or group[1] < 1:
                raise ValueError(f"{name} must be (tokens >= 0 (0: all), channels >= 1), got {group}")

    @staticmethod
    def _band(bits: tuple[int, ...], layer: int, num_layers: int) -> int:
        return bits[min(layer * len(bits) // num_layers, len(bits) - 1)]

    def bits(self, layer: int, num_layers: int) -> tuple[int, int]:
        """(K bits, V bits) of `layer` (layers split into len(bits) equal bands)."""
        return self._band(self.key_bits, layer, num_layers), self._band(self.value_bits, layer, num_layers)

    def params(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key_bits": list(self.key_bits),
            "value_bits": list(self.value_bits),
            "key_group": list(self.key_group),
            "value_group": list(self.value_group),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PackedConfig:
        """The config an entry was written with; an unknown format version is refused."""
        if params.get("format") != FORMAT:
            raise ValueError(f"packed entry of format {params.get('format')!r}; this reader decodes format {FORMAT}")
        return cls(
            tuple(int(b) for b in params["key_bits"]),
            tuple(int(b) for b in params["value_bits"]),
            tuple(int(g) for g in params["key_group"]),
            tuple(int(g) for g in params["value_group"]),
        )

    def mean_bits(self) -> float:
        """Code bits per value averaged over K and V and the bands (scales not counted)."""
        return (sum(self.key_bits) / len(self.key_bits) + sum(self.value_bits) / len(self.value_bits)) / 2


def align4(n: int) -> int:
    return (n + 3) // 4 * 4


@dataclass(frozen=True)
class PartLayout:
    """Where one of K / V lives in a layer's section (byte offsets) and how its groups tile [T, C]."""

    bits: int
    group_tokens: int  # tokens per scale group (resolved: 0 became T)
    group_channels: int
    groups_per_row: int  # ceil(C / group_channels)
    scales: int  # S: number of scale groups
    lo: int  # byte offset of lo fp16 [S]
    step: int  # byte offset of step fp16 [S]
    planes: int  # byte offset of planes [bits, plane_bytes]
    end: int  # byte offset after this part (4-aligned)


@dataclass(frozen=True)
class PackedLayout:
    """Byte layout of one layer's section, from (T, C), the layer's bits and the groups' geometry."""

    tokens: int
    channels: int
    plane_bytes: int  # ceil(T * C / 8)
    parts: tuple[PartLayout, PartLayout]  # K, V

    @property
    def nbytes(self) -> int:
        return self.parts[1].end

    @classmethod
    def of(cls, config: PackedConfig, tokens: int, channels: int, layer: int, num_layers: int) -> PackedLayout:
        plane_bytes = (tokens * channels + 7) // 8
        parts = []
        start = 0
        for bits, (gt, gc) in zip(config.bits(layer, num_layers), (config.key_group, config.value_group)):
            gt = gt or tokens
            per_row = -(-channels // gc)
            scales = -(-tokens // gt) * per_row
            lo, step, planes = start, start + 2 * scales, start + 4 * scales
            end = align4(planes + bits * plane_bytes)
            parts.append(PartLayout(bits, gt, gc, per_row, scales, lo, step, planes, end))
            start = end
        return cls(tokens, channels, plane_bytes, (parts[0], parts[1]))
