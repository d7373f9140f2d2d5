"""packed: a fixed-rate, GPU-decodable lossy codec for chunk KV (2-4 bits/value, no entropy coding).

Per layer, K and V are each quantized to `b` bits (set per band of layers, separately for K and V,
like cachegen's bins) on a uniform grid per *scale group*: K per channel over all the chunk's tokens,
V per channel too by default (`PackedConfig.key_group` / `value_group`: tokens x channels sharing one
grid). Each group stores its grid as two fp16 numbers, `lo` and `step`, picked by searching a few
clipping ranges for the least squared error; a value decodes as `lo + code * step`, computed in fp32
(exact: `code * step` needs at most 19 mantissa bits) and rounded once to the output dtype, so every
decoder (torch on any device, the Triton kernel) gives the same bits.

Codes are stored as *bit planes*: plane j holds bit j of every code, 8 codes per byte (little bit
order), so any width 1..8 unpacks the same way: one byte per plane for 8 outputs, no entropy state,
no data-dependent control flow. Section of one layer (all offsets 4-byte aligned):

    K: lo fp16 [S_k] | step fp16 [S_k] | planes uint8 [b_k, ceil(T*C / 8)] | pad to 4
    V: the same with S_v, b_v

That is format 1. Format 2, what the writer writes, gives each channel its own width within the layer's
bits (a wide channel more, by equal step: compression/packed_widths.py) and stores the codes as one bit
stream with an int16 table of where each channel's code starts (layout: compression/packed_layout.py).
`PackedLayout` computes the offsets from the shape and params alone, for both, so a device decoder needs
no host read of the section. The format version is `params["format"]`; a reader decodes 1 and 2 and
refuses a version it does not know.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
import torch

from ..chunk_cache import ChunkKV
from .codec import EncodedKV
from .layered import CodecError, LayeredCodec, LayerTask
from .packed_encode import encode_layers
from .packed_layout import FORMAT, MAX_BITS, PackedConfig, PackedLayout, PartLayout
from .packed_widths import channel_widths, pack_stream, prefix_of, unpack_stream
from .quant import check_finite

__all__ = ["FORMAT", "MAX_BITS", "PackedCodec", "PackedConfig", "PackedLayout", "PartLayout"]

_FP16_MAX = 65504.0
_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # share of each side's range kept, searched per group


def scale_index(part: PartLayout, tokens: int, channels: int) -> torch.Tensor:
    """The scale group of every element of a [T, C] part: [T, C] int64."""
    t = torch.arange(tokens)[:, None] // part.group_tokens
    c = torch.arange(channels)[None, :] // part.group_channels
    return t * part.groups_per_row + c  # [T, C]


def fit_grid(
    x: torch.Tensor, group: torch.Tensor, scales: int, bits: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) fp16 [S] for values `x` [N] (float64) in groups `group` [N] of `bits` wide codes (one width,
    or one per group [S]): per group, the grid of 2**bits levels over a clipped range (each side of the
    mean shrunk by one of `_CLIPS`) with the least squared error. A 0-bit group is its mean (step 0)."""
    like = dict(dtype=x.dtype, device=x.device)
    levels = ((1 << torch.as_tensor(bits, device=x.device)) - 1).to(x.dtype).expand(scales)  # [S]
    lo_x = torch.full((scales,), math.inf, **like).scatter_reduce(0, group, x, "amin")
    hi_x = torch.full((scales,), -math.inf, **like).scatter_reduce(0, group, x, "amax")
    mean = torch.zeros(scales, **like).scatter_reduce(0, group, x, "mean", include_self=False)
    best = None
    for clip in _CLIPS:  # each side pulled toward the group's mean, so one outlier does not stretch the grid
        lo_c, hi_c = mean - clip * (mean - lo_x), mean + clip * (hi_x - mean)
        step = ((hi_c - lo_c) / levels.clamp_min(1)).clamp_min(2.0**-24).half()  # [S]: fp16, what the decoder reads
        lo = lo_c.half()
        err = (_dequant(_codes(x, group, lo, step, levels), group, lo, step) - x).pow(2)
        sse = torch.zeros(scales, **like).index_add_(0, group, err)  # [S]
        if best is None:
            best = (sse, lo, step)
        else:
            take = sse < best[0]
            best = (torch.where(take, sse, best[0]), torch.where(take, lo, best[1]), torch.where(take, step, best[2]))
    flat = levels == 0
    return torch.where(flat, mean.half(), best[1]), torch.where(flat, torch.zeros_like(best[2]), best[2])


def _codes(
    x: torch.Tensor, group: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, levels: float | torch.Tensor
) -> torch.Tensor:
    """round((x - lo) / step) clamped to 0..levels ([N] float64); `levels` one number or one per group [S]."""
    top = levels[group] if isinstance(levels, torch.Tensor) else torch.tensor(float(levels), dtype=x.dtype)
    step = step.double().masked_fill(step == 0, 1.0)  # a 0-bit group: code 0 whatever the step
    return torch.minimum(torch.round((x - lo.double()[group]) / step[group]).clamp_min(0), top)


def _dequant(code: torch.Tensor, group: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The decoder's arithmetic: fp32 lo + code * step (the product is exact in fp32)."""
    return lo.float()[group] + code.float() * step.float()[group]


def dequant_part(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, part: PartLayout) -> torch.Tensor:
    """Values [T, C] fp32 of one part's codes [T, C] and grids [S] (fp16): `lo + code * step`. Grids
    that tile [T, C] exactly broadcast (no per-element gather); the rest are gathered by scale_index."""
    t, c = codes.shape
    if t % part.group_tokens or c % part.group_channels:
        group = scale_index(part, t, c).to(codes.device)  # [T, C]
        return lo.float()[group] + codes.float() * step.float()[group]
    rows, gt, per_row, gc = t // part.group_tokens, part.group_tokens, part.groups_per_row, part.group_channels
    shape = (rows, 1, per_row, 1)
    x = codes.view(rows, gt, per_row, gc).float()  # [rows, gt, per_row, gc]
    return (lo.float().view(shape) + x * step.float().view(shape)).view(t, c)


def pack_planes(codes: np.ndarray | torch.Tensor, bits: int) -> bytes:
    """Bit planes of `codes` [N] (uint8 < 2**bits): plane j = bit j of each code, 8 codes a byte, little bit
    order (numpy's `packbits(..., bitorder="little")`). Packs where `codes` are (a GPU too); returns host bytes."""
    codes = torch.from_numpy(codes) if isinstance(codes, np.ndarray) else codes
    n = codes.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes.reshape(-1)
    octets = padded.view(-1, 8).to(torch.int32)  # [N / 8, 8]: code i of each byte -> bit i
    weights = torch.arange(8, dtype=torch.int32, device=codes.device)  # [8]
    planes = torch.stack([(((octets >> j) & 1) << weights).sum(dim=1) for j in range(bits)])  # [bits, N / 8]
    return planes.to(torch.uint8).cpu().numpy().tobytes()


_LITTLE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # [256, 8]


def unpack_planes(planes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes [n] uint8 from `planes` [bits, ceil(n / 8)] uint8 (inverse of `pack_planes`)."""
    codes = _LITTLE_BITS.take(planes[0], axis=0).reshape(-1)[:n].copy()  # [n]
    for j in range(1, bits):
        codes |= _LITTLE_BITS.take(planes[j], axis=0).reshape(-1)[:n] << j
    return codes


def _check_section(section_len: int, layout: PackedLayout) -> None:
    if section_len != layout.nbytes:
        raise ValueError(f"packed section is {section_len} bytes; its layout needs {layout.nbytes}")


def _encode_part_v2(x: torch.Tensor, part: PartLayout, out: bytearray) -> None:
    """Format 2, one part [T, C] (float64) into its bytes of `out`: widths by equal step, per-channel grids
    of those widths, the prefix table and the code stream (the reference; packed_encode.py is the fast one)."""
    t, c = x.shape
    widths = channel_widths(x.amax(dim=0) - x.amin(dim=0), [part.code_bits])  # [C]
    group = scale_index(part, t, c).reshape(-1).to(x.device)  # [T*C]: the channel
    values = x.reshape(-1)
    lo, step = fit_grid(values, group, part.scales, widths)
    codes = _codes(values, group, lo, step, ((1 << widths) - 1).double()).to(torch.uint8).view(t, c)
    out[part.lo : part.step] = lo.view(torch.uint8).cpu().numpy().tobytes()
    out[part.step : part.prefix] = step.view(torch.uint8).cpu().numpy().tobytes()
    out[part.prefix : part.prefix + 2 * (c + 1)] = prefix_of(widths).to(torch.int16).cpu().numpy().tobytes()
    stream = pack_stream(codes, widths).cpu().numpy().tobytes()
    out[part.planes : part.planes + len(stream)] = stream


def stored_widths(prefix: np.ndarray, code_bits: int) -> np.ndarray:
    """Channel widths int64 [C] of a stored prefix table (uint8 bytes of int16 [C + 1]); a table that is not
    one (not from 0 to B, a width outside 0..8) raises CodecError."""
    table = prefix.view(np.int16).astype(np.int64)
    widths = np.diff(table)
    if table[0] != 0 or table[-1] != code_bits or widths.min() < 0 or widths.max() > MAX_BITS:
        raise CodecError(f"packed format 2 section: its channel widths do not add up to {code_bits} bits per token")
    return widths


class PackedCodec(LayeredCodec):
    """Packed K/V codes (format 2: per-channel widths; format 1: bit planes) with one fp16 (lo, step) grid per
    scale group; decodes on any device (`device_layer`: the Triton kernel on CUDA, torch elsewhere),
    bit-identically."""

    name = "packed"
    lossless = False
    device_decode = True
    encodes_on_device = True  # the grid search and bit packing run where the KV is (the GPU after a precompute)

    def __init__(self, config: PackedConfig | None = None, fused: bool = True) -> None:
        self.config = config or PackedConfig()
        self.fused = fused  # encode every layer at once (packed_encode.py); False: layer by layer (the reference)

    @property
    def rel_error(self) -> float:
        """Stated bound on ||x - x'|| / ||x|| for Gaussian-like groups (range <= 6 std, no clipping
        chosen): rounding noise step / sqrt(12) with step = range / (2**b - 1), at the fewest bits (format 2:
        the fewest whole bits of a band's mean width, at least 1; its channels split those bits by equal step,
        which is no worse in total squared error than equal widths where the groups are alike)."""
        bits = min(min(self.config.key_bits), min(self.config.value_bits))
        return 6.0 / ((1 << max(1, math.floor(bits))) - 1) / math.sqrt(12.0)

    def params(self) -> dict[str, Any]:
        return self.config.params()

    # -- encode ----------------------------------------------------------------------------------------
    def encode(self, kv: ChunkKV) -> EncodedKV:
        """The fused encoder (all layers in a few large ops where the KV is; the reference's bytes), or the
        reference layer by layer with `fused=False`."""
        if not self.fused:
            return super().encode(kv)
        x = kv.kv.detach()  # [2, L, T, H, D]
        check_finite(x, self.name)
        if float(x.abs().max()) > _FP16_MAX:
            raise ValueError(f"packed stores fp16 grids; this chunk's KV exceeds |x| = {_FP16_MAX}")
        t, c = x.shape[2], x.shape[3] * x.shape[4]
        layouts = [PackedLayout.of(self.config, t, c, layer, kv.num_layers) for layer in range(kv.num_layers)]
        return self.framed(kv, encode_layers(x, layouts, _CLIPS))

    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        check_finite(layer_kv, self.name)
        if float(layer_kv.abs().max()) > _FP16_MAX:
            raise ValueError(f"packed stores fp16 grids; this chunk's KV exceeds |x| = {_FP16_MAX}")
        t = layer_kv.shape[1]
        x = layer_kv.double().reshape(2, t, -1)  # [2, T, C]
        c = x.shape[2]
        layout = PackedLayout.of(self.config, t, c, layer, num_layers)
        out = bytearray(layout.nbytes)
        for kv, part in enumerate(layout.parts):
            if layout.format == 2:
                _encode_part_v2(x[kv], part, out)
                continue
            group = scale_index(part, t, c).reshape(-1).to(x.device)  # [T*C]
            values = x[kv].reshape(-1)  # [T*C]
            lo, step = fit_grid(values, group, part.scales, part.bits)
            codes = _codes(values, group, lo, step, (1 << part.bits) - 1).to(torch.uint8)  # [T*C]
            out[part.lo : part.step] = lo.view(torch.uint8).cpu().numpy().tobytes()
            out[part.step : part.planes] = step.view(torch.uint8).cpu().numpy().tobytes()
            planes = pack_planes(codes, part.bits)
            out[part.planes : part.planes + len(planes)] = planes
        return bytes(out)

    # -- decode on the host (reference) ----------------------------------------------------------------
    def decode_section(self, section, params, shape, stored, layer, num_layers, device) -> torch.Tensor:
        t, h, d = shape
        c = h * d
        layout = PackedLayout.of(PackedConfig.from_params(params), t, c, layer, num_layers)
        _check_section(len(section), layout)
        buf = np.frombuffer(section, dtype=np.uint8)
        out = torch.empty((2, t, c), dtype=torch.float32)  # [2, T, C]
        for kv, part in enumerate(layout.parts):
            lo = torch.from_numpy(buf[part.lo : part.step].copy()).view(torch.float16)  # [S]
            step = torch.from_numpy(buf[part.step : part.step + 2 * part.scales].copy()).view(torch.float16)  # [S]
            if layout.format == 2:
                widths = stored_widths(buf[part.prefix : part.prefix + 2 * (c + 1)], part.code_bits)  # [C]
                codes = torch.from_numpy(unpack_stream(buf[part.planes : part.end], widths, t))  # [T, C] uint8
            else:
                planes = buf[part.planes : part.planes + part.bits * layout.plane_bytes].reshape(part.bits, -1)
                codes = torch.from_numpy(unpack_planes(planes, part.bits, t * c)).view(t, c)  # [T, C] uint8
            out[kv] = dequant_part(codes, lo, step, part)
        return out.view(2, t, h, d).to(device)

    # -- decode on the device --------------------------------------------------------------------------
    def device_layer(self, task: LayerTask, section: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`task`'s layer [2, T, H, D] in `task.dtype`, decoded where `section` (its bytes as a uint8
        tensor, e.g. copied to the GPU) lives: the Triton kernel on CUDA when triton is installed,
        else torch ops on that device. Writes into `out` when given (contiguous [2, T, H, D])."""
        t, h, d = task.shape
        layout = PackedLayout.of(PackedConfig.from_params(task.params), t, h * d, task.layer, task.num_layers)
        _check_device_section(section, layout.nbytes)
        if out is None:
            out = torch.empty((2, t, h, d), dtype=task.dtype, device=section.device)
        elif tuple(out.shape) != (2, t, h, d) or not out.is_contiguous() or out.device != section.device:
            raise ValueError(f"out must be a contiguous [2, {t}, {h}, {d}] tensor on {section.device}")
        from .packed_triton import HAS_TRITON, decode_packed_triton

        if section.is_cuda and HAS_TRITON:
            decode_packed_triton(section, layout, out)
        else:
            decode_packed_torch(section, layout, out)
        return out

    @staticmethod
    def _layouts(tasks, params: list[str] | None = None) -> list[PackedLayout]:
        """Each task's layout; `params`: the tasks' params as sorted JSON, when the caller has them already."""
        params = params or [json.dumps(t.params, sort_keys=True) for t in tasks]
        return [_layout(p, t.shape, t.layer, t.num_layers) for p, t in zip(params, tasks)]

    def rows_meta(self, tasks, offsets, rows) -> np.ndarray | None:
        from .packed_triton import packed_rows_meta

        layouts = self._layouts(tasks)
        for task, layout in zip(tasks, layouts):
            if len(task.section) != layout.nbytes:
                raise CodecError(f"packed section is {len(task.section)} bytes; its layout needs {layout.nbytes}")
        return np.asarray(packed_rows_meta(layouts, list(offsets), list(rows)), dtype=np.int64)

    def device_rows(self, tasks, src, offsets, out, rows, meta=None) -> None:
        """One Triton launch per group of entries sharing params (normally all of them) on CUDA; the
        per-entry torch decoder elsewhere (or without `meta`)."""
        from .packed_triton import HAS_TRITON, decode_packed_rows_triton

        if meta is None or not (src.is_cuda and HAS_TRITON and out.is_contiguous()):
            super().device_rows(tasks, src, offsets, out, rows)
            return
        params = [json.dumps(t.params, sort_keys=True) for t in tasks]
        groups: dict[str, list[int]] = {}
        for j, key in enumerate(params):
            groups.setdefault(key, []).append(j)
        layouts = self._layouts(tasks, params)
        for members in groups.values():
            table = meta if len(members) == len(tasks) else meta[torch.tensor(members, device=meta.device)]
            decode_packed_rows_triton(src, table, [layouts[j] for j in members], out)


@functools.lru_cache(maxsize=4096)
def _layout(params: str, shape: tuple[int, int, int], layer: int, num_layers: int) -> PackedLayout:
    """The layout of a layer from an entry's params (as sorted JSON) and shape (T, H, D), cached: the loader
    asks for every entry of every layer of every request."""
    config = PackedConfig.from_params(json.loads(params))
    return PackedLayout.of(config, shape[0], shape[1] * shape[2], layer, num_layers)


def _check_device_section(section: torch.Tensor, nbytes: int) -> None:
    if section.dtype != torch.uint8 or section.dim() != 1:
        raise ValueError(f"section must be a 1-D uint8 tensor, got {section.dtype} of shape {tuple(section.shape)}")
    if section.numel() != nbytes:
        raise ValueError(f"packed section is {section.numel()} bytes; its layout needs {nbytes}")


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def decode_packed_torch(section: torch.Tensor, layout: PackedLayout, out: torch.Tensor) -> torch.Tensor:
    """The torch decoder on `section`'s device (the Triton kernel's reference): writes `out` [2, T, H, D]."""
    t, c = layout.tokens, layout.channels
    n = t * c
    dev = section.device
    shifts = _BIT_SHIFTS.get(dev)
    if shifts is None:
        shifts = _BIT_SHIFTS[dev] = torch.arange(8, dtype=torch.uint8, device=dev)
    flat = out.view(2, n)
    for kv, part in enumerate(layout.parts):
        lo = section[part.lo : part.step].view(torch.float16)  # [S]
        step = section[part.step : part.step + 2 * part.scales].view(torch.float16)  # [S]
        if layout.format == 2:
            codes = _stream_codes_torch(section, part, t, c)  # [T, C]
            flat[kv] = (lo.float() + codes.float() * step.float()).view(n).to(out.dtype)
            continue
        planes = section[part.planes : part.planes + part.bits * layout.plane_bytes].view(part.bits, -1)
        codes = torch.zeros(layout.plane_bytes * 8, dtype=torch.uint8, device=dev)
        for j in range(part.bits):
            bits = (planes[j][:, None] >> shifts) & 1  # [plane_bytes, 8]
            codes |= bits.reshape(-1) << j
        flat[kv] = dequant_part(codes[:n].view(t, c), lo, step, part).view(n).to(out.dtype)
    return out


def _stream_codes_torch(section: torch.Tensor, part: PartLayout, t: int, c: int) -> torch.Tensor:
    """Format 2 codes int32 [T, C] of one part, read as the Triton kernel reads them: the two bytes each code
    starts in, shifted and masked; the prefix table clamped into the part (a damaged table cannot read out
    of it)."""
    total = part.code_bits
    prefix = section[part.prefix : part.prefix + 2 * (c + 1)].view(torch.int16).to(torch.int64)  # [C + 1]
    first = prefix[:-1].clamp(0, total)  # [C]
    width = (prefix[1:].clamp(max=total) - first).clamp(0, MAX_BITS)
    at = torch.arange(t, device=section.device)[:, None] * total + first  # [T, C] bit address
    at = torch.where(width > 0, at, 0)  # a 0-bit channel reads nothing past the stream
    stream = section[part.planes : part.end].to(torch.int32)
    byte = at >> 3
    pair = stream[byte] | (stream[byte + 1] << 8)
    return (pair >> (at & 7)) & ((1 << width) - 1)
