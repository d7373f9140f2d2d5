"""The fused `packed` encoder: every layer of a chunk in a few large torch ops where the KV is (the GPU).

`PackedCodec.encode_layer` (the reference) searches each layer's grids with float64 scatter/gather ops,
a few hundred small kernels per layer. This encoder does the same search for all layers of one part (K or
V) at once: the scale groups tile [T, C] (padded when they do not), so a group's min / max / mean / squared
error is a reduction over two axes of a view, not a scatter; the 8 clipped grids are tried one after the
other, each a handful of ops over all layers; bit planes of every layer come out of 8 shift-and-sum ops.
Only the planes and grids cross to the host.

Same bytes as the reference: the grids' (lo, step) are computed from the group statistics in float64 with
the reference's arithmetic (the mean is summed in another order, which could move a grid only when it
lands within 1e-16 of an fp16 rounding boundary); the codes `round((x - lo) / step)` are computed in fp32,
which gives the float64 result whenever `x - lo` is exact in fp32 (fp16 KV and fp16 grids: values within
2**24 of each other's spacing, i.e. always for KV a group shares), since a quotient that is not a tie lies
at least 2**-12 from one; errors against the decoder's fp32 values are squared and summed in float64, so the
best of the 8 grids is the reference's unless two grids' errors tie to 1e-16. tests/test_packed_encode.py
checks the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .packed_layout import PackedLayout
from .packed_widths import channel_widths, pack_stream, prefix_of


def _tiled(x: torch.Tensor, gt: int, gc: int, fill: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [L, T, C] as [L, rows, gt, per_row, gc] (padded with `fill` where groups do not tile) and the mask
    of real elements (None when nothing was padded)."""
    n_layers, t, c = x.shape
    pad_t, pad_c = -t % gt, -c % gc
    if pad_t or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_t), value=fill)
        real = torch.zeros((1, t + pad_t, c + pad_c), dtype=torch.bool, device=x.device)
        real[:, :t, :c] = True
        real = real.view(1, (t + pad_t) // gt, gt, (c + pad_c) // gc, gc)
    else:
        real = None
    return x.reshape(n_layers, (t + pad_t) // gt, gt, (c + pad_c) // gc, gc), real


def _groups(x: torch.Tensor) -> torch.Tensor:
    """Reduce over the two in-group axes of a tiled [L, rows, gt, per_row, gc] view: sum -> [L, rows, per_row]."""
    return x.sum(dim=(2, 4))


def _codes(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """round((x - lo) / step) clamped to 0..levels, in fp32 (broadcast over the tiled view)."""
    codes = torch.round((x - lo) / step).clamp_(min=0)
    return torch.minimum(codes, levels, out=codes)


def fit_part(
    x: torch.Tensor, widths: torch.Tensor, gt: int, gc: int, clips: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grids and codes of one part of every layer: `x` [L, T, C] (any float dtype), `widths` int64 [L, S]
    (each scale group's code width, 0..8), the grids clipped by each of `clips` tried in order.
    Returns lo, step fp16 [L, S], codes uint8 [L, T, C] (as `packed.fit_grid` + `_codes` would give)."""
    n_layers, t, c = x.shape
    xf = x.float()
    levels64 = ((1 << widths) - 1).double()  # [L, S]
    lo_view, real = _tiled(xf, gt, gc, math.inf)
    hi_view = _tiled(xf, gt, gc, -math.inf)[0]
    lo_x = lo_view.amin(dim=(2, 4)).reshape(n_layers, -1).double()  # [L, S]
    hi_x = hi_view.amax(dim=(2, 4)).reshape(n_layers, -1).double()
    x_tiled = _tiled(xf, gt, gc, 0.0)[0]  # [L, rows, gt, per_row, gc]
    x64 = x_tiled.double()
    count = float(gt * gc) if real is None else _groups(real.double()).reshape(1, -1)
    mean = _groups(x64).reshape(n_layers, -1) / count  # [L, S] float64
    shape = (n_layers, x_tiled.shape[1], 1, x_tiled.shape[3], 1)
    levels32 = levels64.float().view(shape)
    best_sse = best_lo = best_step = None
    for clip in clips:  # the reference's arithmetic, in float64 on [L, S]
        lo_c, hi_c = mean - clip * (mean - lo_x), mean + clip * (hi_x - mean)
        step = ((hi_c - lo_c) / levels64.clamp_min(1)).clamp_min(2.0**-24).half()  # [L, S]
        lo = lo_c.half()
        lo32, step32 = lo.float().view(shape), step.float().view(shape)
        codes = _codes(x_tiled, lo32, step32, levels32)
        err = ((lo32 + codes * step32).double() - x64).square_()  # the decoder's fp32 value, error in float64
        if real is not None:
            err = err * real
        sse = _groups(err).reshape(n_layers, -1)  # [L, S]
        if best_sse is None:
            best_sse, best_lo, best_step = sse, lo, step
        else:
            take = sse < best_sse  # strictly: the earlier clip wins a tie, as in the reference
            best_sse = torch.where(take, sse, best_sse)
            best_lo, best_step = torch.where(take, lo, best_lo), torch.where(take, step, best_step)
    flat = levels64 == 0  # 0-bit groups: their mean, step 0 (code 0)
    best_lo = torch.where(flat, mean.half(), best_lo)
    best_step = torch.where(flat, torch.zeros_like(best_step), best_step)
    lo32, step32 = best_lo.float().view(shape), best_step.float().view(shape)
    codes = _codes(x_tiled, lo32, step32.masked_fill(step32 == 0, 1.0), levels32).to(torch.uint8)
    codes = codes.reshape(n_layers, x_tiled.shape[1] * gt, -1)[:, :t, :c]  # [L, T, C]
    return best_lo, best_step, codes


def planes_of(codes: torch.Tensor, max_bits: int) -> torch.Tensor:
    """Bit planes [max_bits, L, ceil(N / 8)] uint8 of codes [L, N] (plane j = bit j, 8 codes a byte, little
    bit order: `packed.pack_planes` for every layer at once)."""
    n_layers, n = codes.shape
    padded = torch.nn.functional.pad(codes, (0, -n % 8)).view(n_layers, -1, 8).to(torch.int32)  # [L, N/8, 8]
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)  # [8]
    return torch.stack([(((padded >> j) & 1) * weights).sum(dim=2) for j in range(max_bits)]).to(torch.uint8)


def encode_layers(kv: torch.Tensor, layouts: Sequence[PackedLayout], clips: Sequence[float]) -> list[bytes]:
    """Each layer's section (the reference encoder's bytes) of `kv` [2, L, T, H, D] (finite, |x| <= 65504)
    laid out as `layouts` (one per layer, sharing the groups' geometry and format)."""
    _, n_layers, t = kv.shape[:3]
    x = kv.reshape(2, n_layers, t, -1)  # [2, L, T, C]
    if layouts[0].format == 2:
        return _encode_layers_v2(x, layouts, clips)
    host = []
    for part in range(2):
        bits = [layout.parts[part].bits for layout in layouts]
        geometry = layouts[0].parts[part]
        widths = torch.tensor(bits, device=x.device).view(n_layers, 1).expand(n_layers, geometry.scales)
        lo, step, codes = fit_part(x[part], widths, geometry.group_tokens, geometry.group_channels, clips)
        planes = planes_of(codes.reshape(n_layers, -1), max(bits))  # [B, L, plane_bytes]
        host.append((lo.cpu().numpy(), step.cpu().numpy(), planes.cpu().numpy()))
    sections = []
    for layer, layout in enumerate(layouts):
        out = bytearray(layout.nbytes)
        for part, (lo, step, planes) in zip(layout.parts, host):
            out[part.lo : part.step] = lo[layer].tobytes()
            out[part.step : part.planes] = step[layer].tobytes()
            out[part.planes : part.planes + part.bits * layout.plane_bytes] = np.ascontiguousarray(
                planes[: part.bits, layer]
            ).tobytes()
        sections.append(bytes(out))
    return sections


def _encode_layers_v2(x: torch.Tensor, layouts: Sequence[PackedLayout], clips: Sequence[float]) -> list[bytes]:
    """Format 2 of `x` [2, L, T, C]: per part, every layer's channel widths (equal step, packed_widths.py) and
    grids in one pass, then each layer's stream."""
    n_layers, t, c = x.shape[1:]
    sections = [bytearray(layout.nbytes) for layout in layouts]
    for kv in range(2):
        xf = x[kv].float()
        spread = xf.amax(dim=1).double() - xf.amin(dim=1).double()  # [L, C]
        widths = channel_widths(spread, [layout.parts[kv].code_bits for layout in layouts])  # [L, C]
        lo, step, codes = fit_part(x[kv], widths, t, 1, clips)
        prefix = prefix_of(widths).to(torch.int16)  # [L, C + 1]
        host = lo.cpu().numpy(), step.cpu().numpy(), prefix.cpu().numpy()
        for layer, (out, layout) in enumerate(zip(sections, layouts)):
            part = layout.parts[kv]
            stream = pack_stream(codes[layer], widths[layer]).cpu().numpy().tobytes()
            out[part.lo : part.step] = host[0][layer].tobytes()
            out[part.step : part.prefix] = host[1][layer].tobytes()
            out[part.prefix : part.prefix + 2 * (c + 1)] = host[2][layer].tobytes()
            out[part.planes : part.planes + len(stream)] = stream
    return [bytes(s) for s in sections]
