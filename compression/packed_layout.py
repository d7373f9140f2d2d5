"""The `packed` codec's parameters and byte layout: `PackedConfig` (bits per band of layers, scale-group
geometry, the format version, `params` as stored in each entry) and `PackedLayout` (the offsets of one
layer's section, from the shape and params alone). Shared by the codec (compression/packed.py), its
encoders and its Triton kernel (compression/packed_triton.py), which import it, not each other.

Two format versions; a reader decodes both, a writer writes `FORMAT` (2):

- **1**: every value of a part (K or V) of a layer has the band's width `b`; codes stored as bit planes
  (plane j = bit j of every code in [T, C] order, 8 codes a byte). Grids per scale group.
- **2**: per-channel widths. A band's bits are the *mean* width of the part's channels (any multiple of
  1/C, e.g. 2.5), so a layer's part holds exactly `B = round(bits * C)` code bits per token; the encoder
  spreads them over the channels of each entry (wide channels more, see packed_widths.py) and stores
  the split as an int16 prefix table. Grids per channel over all tokens. Codes are one little-endian
  bit stream, token-major: token t's codes start at bit t * B, channel c's at t * B + prefix[c],
  prefix[c + 1] - prefix[c] bits wide (0..8; a 0-bit channel decodes to its `lo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMAT = 2  # what the writer writes
FORMATS = (1, 2)  # what a reader decodes
MAX_BITS = 8
PER_CHANNEL = (0, 1)  # scale group: one channel over all the chunk's tokens


@dataclass(frozen=True)
class PackedConfig:
    """Bits per equal band of layers (early first) for K and V, and the scale groups' geometry:
    (tokens, channels) sharing one grid, 0 tokens meaning all the chunk's tokens. Format 1: the bits are
    every value's width (ints 1..8); format 2: the channels' mean width (numbers in (0, 8], grids per
    channel). Defaults: see docs/BENCHMARKS.md ("packed"); a calibrated schedule (`ragkv calibrate`)
    replaces the bits."""

    key_bits: tuple[float, ...] = (3, 3, 3, 3, 3, 3)
    value_bits: tuple[float, ...] = (2, 2, 2, 2, 2, 2)
    key_group: tuple[int, int] = PER_CHANNEL  # per channel, over all tokens
    value_group: tuple[int, int] = PER_CHANNEL
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"packed format {self.format!r}; this codec knows formats {FORMATS}")
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if self.format == 1:
                ok = all(isinstance(b, int) and 1 <= b <= MAX_BITS for b in bits)
                accepted = f"ints in 1..{MAX_BITS}"
            else:
                ok = all(isinstance(b, (int, float)) and 0 < b <= MAX_BITS for b in bits)
                accepted = f"numbers in (0, {MAX_BITS}]"
            if not bits or not ok:
                raise ValueError(f"{name} must be a non-empty tuple of {accepted} (format {self.format}), got {bits}")
        for name in ("key_group", "value_group"):
            group = tuple(getattr(self, name))
            if len(group) != 2 or group[0] < 0 or group[1] < 1:
                raise ValueError(f"{name} must be (tokens >= 0 (0: all), channels >= 1), got {group}")
            if self.format == 2 and group != PER_CHANNEL:
                raise ValueError(f"format 2 has one grid per channel over all tokens: {name} must be (0, 1)")

    @staticmethod
    def _band(bits: tuple[float, ...], layer: int, num_layers: int) -> float:
        return bits[min(layer * len(bits) // num_layers, len(bits) - 1)]

    def bits(self, layer: int, num_layers: int) -> tuple[float, float]:
        """(K bits, V bits) of `layer` (layers split into len(bits) equal bands)."""
        return self._band(self.key_bits, layer, num_layers), self._band(self.value_bits, layer, num_layers)

    def params(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "key_bits": list(self.key_bits),
            "value_bits": list(self.value_bits),
            "key_group": list(self.key_group),
            "value_group": list(self.value_group),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PackedConfig:
        """The config an entry was written with; an unknown format version is refused."""
        version = params.get("format")
        if version not in FORMATS:
            raise ValueError(f"packed entry of format {version!r}; this reader decodes formats {FORMATS}")
        number = int if version == 1 else _number
        return cls(
            tuple(number(b) for b in params["key_bits"]),
            tuple(number(b) for b in params["value_bits"]),
            tuple(int(g) for g in params["key_group"]),
            tuple(int(g) for g in params["value_group"]),
            version,
        )

    def mean_bits(self) -> float:
        """Code bits per value averaged over K and V and the bands (scales not counted)."""
        return (sum(self.key_bits) / len(self.key_bits) + sum(self.value_bits) / len(self.value_bits)) / 2


def format_for(key_group: tuple[int, int], value_group: tuple[int, int]) -> int:
    """The format a writer uses for grids of this geometry: 2 for per-channel grids, else 1."""
    return FORMAT if tuple(key_group) == tuple(value_group) == PER_CHANNEL else 1


def _number(b: Any) -> float:
    """A stored width as JSON gave it (an int stays an int, so params round-trip unchanged)."""
    return b if isinstance(b, int) else float(b)


def align4(n: int) -> int:
    return (n + 3) // 4 * 4


def code_bits(bits: float, channels: int) -> int:
    """Format 2: a part's code bits per token, `bits` (mean width) times `channels`, rounded."""
    return min(int(round(bits * channels)), MAX_BITS * channels)


@dataclass(frozen=True)
class PartLayout:
    """Where one of K / V lives in a layer's section (byte offsets) and how its groups tile [T, C]."""

    bits: int  # format 1: every code's width; format 2: the widest a channel may be (MAX_BITS)
    group_tokens: int  # tokens per scale group (resolved: 0 became T)
    group_channels: int
    groups_per_row: int  # ceil(C / group_channels)
    scales: int  # S: number of scale groups
    lo: int  # byte offset of lo fp16 [S]
    step: int  # byte offset of step fp16 [S]
    planes: int  # byte offset of the codes: format 1 planes [bits, plane_bytes]; format 2 the bit stream
    end: int  # byte offset after this part (4-aligned)
    prefix: int = -1  # format 2: byte offset of the channels' bit offsets int16 [C + 1]
    code_bits: int = 0  # format 2: B, code bits per token (prefix[C])


@dataclass(frozen=True)
class PackedLayout:
    """Byte layout of one layer's section, from (T, C), the layer's bits and the groups' geometry."""

    tokens: int
    channels: int
    plane_bytes: int  # format 1: ceil(T * C / 8)
    parts: tuple[PartLayout, PartLayout]  # K, V
    format: int = 1

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
            if config.format == 1:
                end = align4(planes + bits * plane_bytes)
                parts.append(PartLayout(bits, gt, gc, per_row, scales, lo, step, planes, end))
            else:  # prefix int16 [C + 1], then the stream (one spare byte: a code is read as two bytes)
                total = code_bits(bits, channels)
                planes = align4(planes + 2 * (channels + 1))
                end = align4(planes + (tokens * total + 7) // 8 + 1)
                parts.append(
                    PartLayout(MAX_BITS, gt, gc, per_row, scales, lo, step, planes, end, lo + 4 * scales, total)
                )
            start = end
        return cls(tokens, channels, plane_bytes, (parts[0], parts[1]), config.format)
