"""The Triton kernel that decodes one layer of a `packed` section where its bytes are (the GPU).

One launch per layer, grid (blocks of elements, K/V): each lane makes one output element from one bit
of each of its part's planes (8 neighbouring lanes share a byte, served by the cache) and its scale
group's fp16 (lo, step): `lo + code * step` in fp32, rounded once to the output dtype, exactly as
`decode_packed_torch` (bf16 rounded to nearest even by integer arithmetic, so the interpreter, which
would truncate, and the compiled kernel agree). Offsets come from `PackedLayout` (host arithmetic:
nothing is read back from the device). Runs on CPU tensors under `TRITON_INTERPRET=1` (how the tests
check it without a GPU).
"""

from __future__ import annotations

import torch

from .packed_layout import MAX_BITS, PackedLayout
from .triton_common import HAS_TRITON, block_size, store_value, tl, triton

BLOCK = 1024  # elements per program on the GPU

if HAS_TRITON:

    @triton.jit
    def _decode_block(
        src,
        src16,
        src_i16,
        out_at,
        e,
        live,
        bits,
        gt,
        gc,
        per_row,
        lo_at,
        step_at,
        planes_at,
        plane_bytes,
        channels,
        prefix_at,
        code_bits,
        MAX_B: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        OUT_BF16: tl.constexpr,
        V2: tl.constexpr,
    ):
        """Elements `e` (with `live` lanes) of one part, stored at `out_at + e` as `lo + code * step` (fp32)
        with the scale group's fp16 (lo, step). Format 1: one bit of each of the part's planes makes the code;
        format 2 (`V2`): the code is read from the two bytes of the stream it starts in, at bit
        t * code_bits + prefix[c], prefix[c + 1] - prefix[c] bits wide (the table clamped into the part)."""
        t = e // channels
        c = e % channels
        if V2:
            first = tl.load(src_i16 + prefix_at + c, mask=live, other=0).to(tl.int64)
            after = tl.load(src_i16 + prefix_at + c + 1, mask=live, other=0).to(tl.int64)
            first = tl.minimum(tl.maximum(first, 0), code_bits)
            width = tl.minimum(tl.maximum(tl.minimum(after, code_bits) - first, 0), MAX_B)
            at = tl.where(width > 0, t.to(tl.int64) * code_bits + first, 0)  # a 0-bit channel: nothing past the stream
            byte = planes_at + (at >> 3)
            pair = tl.load(src + byte, mask=live, other=0).to(tl.int32)
            pair = pair | (tl.load(src + byte + 1, mask=live, other=0).to(tl.int32) << 8)
            code = (pair >> (at & 7).to(tl.int32)) & ((1 << width.to(tl.int32)) - 1)
        else:
            byte = e // 8
            shift = (e % 8).to(tl.int32)
            code = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
            for j in tl.static_range(MAX_B):
                wanted = live & (tl.full([BLOCK_SIZE], j, tl.int32) < bits)  # planes past this part's bits: no load
                plane = tl.load(src + planes_at + j * plane_bytes + byte, mask=wanted, other=0)
                code = code | (((plane.to(tl.int32) >> shift) & 1) << j)
        group = (t // gt) * per_row + c // gc
        lo = tl.load(src16 + lo_at + group, mask=live, other=0.0).to(tl.float32)
        step = tl.load(src16 + step_at + group, mask=live, other=0.0).to(tl.float32)
        store_value(out_at + e, lo + code.to(tl.float32) * step, live, OUT_BF16)


if HAS_TRITON:

    @triton.jit
    def _packed_layer_kernel(
        src,  # uint8 [section bytes]
        src16,  # the same bytes as fp16 (the section's length is a multiple of 4)
        src_i16,  # and as int16 (format 2's prefix tables)
        out,  # [2, T * C] output dtype
        n,  # T * C
        channels,
        plane_bytes,
        k_bits,
        k_gt,
        k_gc,
        k_per_row,
        k_lo,
        k_step,
        k_planes,
        v_bits,
        v_gt,
        v_gc,
        v_per_row,
        v_lo,
        v_step,
        v_planes,
        k_prefix,
        v_prefix,
        k_code_bits,
        v_code_bits,
        MAX_B: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        OUT_BF16: tl.constexpr,
        V2: tl.constexpr,
    ):
        kv = tl.program_id(1)
        is_v = kv.to(tl.int32)
        bits = k_bits + is_v * (v_bits - k_bits)
        gt = k_gt + is_v * (v_gt - k_gt)
        gc = k_gc + is_v * (v_gc - k_gc)
        per_row = k_per_row + is_v * (v_per_row - k_per_row)
        lo_at = (k_lo + is_v * (v_lo - k_lo)) // 2  # in fp16 elements
        step_at = (k_step + is_v * (v_step - k_step)) // 2
        planes_at = k_planes + is_v * (v_planes - k_planes)
        prefix_at = (k_prefix + is_v * (v_prefix - k_prefix)) // 2  # in int16 elements
        code_bits = k_code_bits + is_v * (v_code_bits - k_code_bits)

        e = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        _decode_block(
            src,
            src16,
            src_i16,
            out + kv * n,
            e,
            e < n,
            bits,
            gt,
            gc,
            per_row,
            lo_at,
            step_at,
            planes_at,
            plane_bytes,
            channels,
            prefix_at,
            code_bits,
            MAX_B,
            BLOCK_SIZE,
            OUT_BF16,
            V2,
        )


def decode_packed_triton(section: torch.Tensor, layout: PackedLayout, out: torch.Tensor) -> torch.Tensor:
    """Decode `section` (uint8, on the device; its storage offset a multiple of 4) into `out`
    [2, T, H, D] (contiguous, same device) with one kernel launch."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: decode with decode_packed_torch, or pip install triton")
    n = layout.tokens * layout.channels
    k, v = layout.parts
    block = block_size(BLOCK)
    grid = (triton.cdiv(n, block), 2)
    bf16 = out.dtype == torch.bfloat16
    _packed_layer_kernel[grid](
        section,
        section.view(torch.float16),
        section.view(torch.int16),
        out.view(torch.int16) if bf16 else out,
        n,
        layout.channels,
        layout.plane_bytes,
        k.bits,
        k.group_tokens,
        k.group_channels,
        k.groups_per_row,
        k.lo,
        k.step,
        k.planes,
        v.bits,
        v.group_tokens,
        v.group_channels,
        v.groups_per_row,
        v.lo,
        v.step,
        v.planes,
        k.prefix,
        v.prefix,
        k.code_bits,
        v.code_bits,
        MAX_B=MAX_BITS,
        BLOCK_SIZE=block,
        OUT_BF16=bf16,
        V2=layout.format == 2,
    )
    return out


# -- several entries of one layer in one launch ------------------------------------------------------------
# Per entry j, `meta[j]` (int64) holds: section offset in `src`, T*C, plane bytes, first output row, then per
# part (K, V): tokens per group, lo / step / planes byte offsets within the section, then (format 2) the
# prefix tables' byte offsets (-1 in format 1).
META_FIELDS = 14

if HAS_TRITON:

    @triton.jit
    def _packed_rows_kernel(
        src,  # uint8: every entry's section, each at a 16-byte aligned offset
        src16,  # the same bytes as fp16
        src_i16,  # and as int16
        out,  # [2, N_rows * C] output dtype: the loader's rows of this layer
        meta,  # int64 [J, META_FIELDS]
        rows_total,  # N_rows * C
        channels,
        k_bits,
        v_bits,
        k_gc,
        v_gc,
        k_per_row,
        v_per_row,
        k_code_bits,
        v_code_bits,
        MAX_B: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        OUT_BF16: tl.constexpr,
        V2: tl.constexpr,
    ):
        kv = tl.program_id(1)
        m = meta + tl.program_id(2) * 14
        is_v = kv.to(tl.int32)
        base = tl.load(m)
        n = tl.load(m + 1)
        plane_bytes = tl.load(m + 2)
        row0 = tl.load(m + 3)
        gt = tl.load(m + 4 + kv)
        lo_at = (base + tl.load(m + 6 + kv)) // 2  # in fp16 elements
        step_at = (base + tl.load(m + 8 + kv)) // 2
        planes_at = base + tl.load(m + 10 + kv)
        prefix_at = (base + tl.load(m + 12 + kv)) // 2  # in int16 elements
        code_bits = k_code_bits + is_v * (v_code_bits - k_code_bits)
        bits = k_bits + is_v * (v_bits - k_bits)
        gc = k_gc + is_v * (v_gc - k_gc)
        per_row = k_per_row + is_v * (v_per_row - k_per_row)

        e = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        _decode_block(
            src,
            src16,
            src_i16,
            out + kv * rows_total + row0 * channels,
            e,
            e < n,
            bits,
            gt,
            gc,
            per_row,
            lo_at,
            step_at,
            planes_at,
            plane_bytes,
            channels,
            prefix_at,
            code_bits,
            MAX_B,
            BLOCK_SIZE,
            OUT_BF16,
            V2,
        )


def packed_rows_meta(layouts: list[PackedLayout], offsets: list[int], rows: list[int]) -> list[list[int]]:
    """The kernel's per-entry table (host ints) for entries with `layouts` at byte `offsets` of the
    shared buffer, writing from output row `rows[j]` on."""
    table = []
    for layout, at, row in zip(layouts, offsets, rows):
        k, v = layout.parts
        table.append(
            [at, layout.tokens * layout.channels, layout.plane_bytes, row, k.group_tokens, v.group_tokens]
            + [k.lo, v.lo, k.step, v.step, k.planes, v.planes, k.prefix, v.prefix]
        )
    return table


def decode_packed_rows_triton(
    src: torch.Tensor, meta: torch.Tensor, layouts: list[PackedLayout], out: torch.Tensor
) -> torch.Tensor:
    """Decode every entry of `meta` (int64 [J, META_FIELDS], on the device; see `packed_rows_meta`) from
    `src` (uint8, on the device) into its rows of `out` [2, N, H, D] (contiguous) with one launch. The
    entries share their bits and group geometry (same params, same layer); token counts may differ."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: decode with decode_packed_torch, or pip install triton")
    k, v = layouts[0].parts
    channels = layouts[0].channels
    max_n = max(layout.tokens * layout.channels for layout in layouts)
    block = block_size(BLOCK)
    bf16 = out.dtype == torch.bfloat16
    grid = (triton.cdiv(max_n, block), 2, len(layouts))
    _packed_rows_kernel[grid](
        src,
        src.view(torch.float16),
        src.view(torch.int16),
        out.view(torch.int16) if bf16 else out,
        meta,
        out.shape[1] * channels,
        channels,
        k.bits,
        v.bits,
        k.group_channels,
        v.group_channels,
        k.groups_per_row,
        v.groups_per_row,
        k.code_bits,
        v.code_bits,
        MAX_B=MAX_BITS,
        BLOCK_SIZE=block,
        OUT_BF16=bf16,
        V2=layouts[0].format == 2,
    )
    return out
