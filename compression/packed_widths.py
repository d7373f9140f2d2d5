"""Format 2 of `packed`: how a part's code bits are split over its channels, and the bit stream that holds
the codes (layout in compression/packed_layout.py).

Widths: a part of a layer has `B` code bits per token to give its C channels (B = mean width x C, from
the params). Squared error of a uniform grid falls 4x per bit, so the least total error for B bits goes
to the channels by equal step: bit j of channel c is worth spread_c * 2**-j (spread = max - min over the
chunk's tokens), and the B largest of those C x 8 candidates are taken (a prefix per channel: the keys
fall with j). Keys are exact in float64 (a power-of-two scaling) and ties keep channel order (a stable
sort), so every encoder, on any device, picks the same widths. Loud key channels (the outliers RoPE
leaves in a few dimensions) get more bits, flat ones fewer, down to 0 (stored as their mean).

Stream: token t's codes occupy bits [t * B, (t + 1) * B), channel c's at prefix[c] within, bit j of a
code at bit prefix[c] + j, bytes in little bit order; one spare zero byte at the end, so a decoder can
read any code as the two bytes it starts in.
"""

from __future__ import annotations

import numpy as np
import torch

from .packed_layout import MAX_BITS


def channel_widths(spread: torch.Tensor, code_bits: torch.Tensor | list[int]) -> torch.Tensor:
    """Widths int64 [..., C] (0..8, each row summing to its `code_bits` entry) for channel spreads
    `spread` [..., C] (float64, >= 0) and the rows' code bits per token `code_bits` [...]."""
    *lead, c = spread.shape
    total = torch.as_tensor(code_bits, dtype=torch.int64, device=spread.device).reshape(*lead, 1)
    halves = torch.pow(2.0, -torch.arange(MAX_BITS, dtype=torch.float64, device=spread.device))  # [8]
    keys = (spread.double()[..., :, None] * halves).reshape(*lead, c * MAX_BITS)  # candidate bits, [..., C*8]
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(c * MAX_BITS, device=spread.device).expand_as(order)
    )
    return (rank < total).reshape(*lead, c, MAX_BITS).sum(dim=-1)


def prefix_of(widths: torch.Tensor) -> torch.Tensor:
    """Each channel's first bit within a token's codes: int64 [..., C + 1] (the last entry is B)."""
    return torch.nn.functional.pad(widths.cumsum(dim=-1), (1, 0))


def stream_bytes(tokens: int, code_bits: int) -> int:
    """Bytes of a part's stream: its T * B bits, rounded up, plus the spare byte."""
    return (tokens * code_bits + 7) // 8 + 1


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def pack_stream(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The stream uint8 [stream_bytes(T, B)] of `codes` [T, C] (uint8, each < 2**width) with `widths` [C]
    (int64), on the codes' device."""
    t, c = codes.shape
    dev = codes.device
    channel = torch.repeat_interleave(torch.arange(c, device=dev), widths)  # [B]: the channel of each bit
    bit = torch.arange(channel.numel(), device=dev) - prefix_of(widths)[channel]  # [B]: its bit in the code
    bits = (codes[:, channel] >> bit.to(torch.uint8)) & 1  # [T, B]
    nbytes = stream_bytes(t, channel.numel())
    flat = torch.zeros(nbytes * 8, dtype=torch.uint8, device=dev)
    flat[: bits.numel()] = bits.reshape(-1)
    weights = _WEIGHTS.get(dev)
    if weights is None:
        weights = _WEIGHTS[dev] = 1 << torch.arange(8, dtype=torch.int32, device=dev)
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_stream(stream: np.ndarray, widths: np.ndarray, tokens: int) -> np.ndarray:
    """Codes uint8 [T, C] of a part's `stream` (uint8 bytes) with `widths` [C] (the host reference: bits
    unpacked, then summed per channel)."""
    c = widths.shape[0]
    total = int(widths.sum())
    codes = np.zeros((tokens, c), dtype=np.uint8)
    if total == 0:
        return codes
    bits = np.unpackbits(stream, bitorder="little")[: tokens * total].reshape(tokens, total).astype(np.uint16)
    prefix = np.concatenate(([0], np.cumsum(widths)[:-1]))
    bit = np.arange(total) - np.repeat(prefix, widths)  # [B]
    wide = widths > 0
    codes[:, wide] = np.add.reduceat(bits << bit, prefix[wide], axis=1).astype(np.uint8)
    return codes
