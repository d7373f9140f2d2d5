"""One Triton launch that dequantizes every `int8` entry of one layer where their bytes are (the GPU).

An int8 section is `scale_k fp32 [C] | scale_v fp32 [T] | K codes int8 [T, C] | V codes int8 [T, C]`
(`compression/quant.py`). Grid (blocks of elements, K/V, entries): each lane makes one output element,
`code * scale` in fp32 (K: its channel's scale, V: its token's), rounded once to the output dtype, so the
bits equal `Int8Codec.device_layer`'s torch arithmetic (bf16 rounded to nearest even by integer arithmetic,
as in `packed_triton`, so the interpreter and the compiled kernel agree). The per-entry table
(`Int8Codec.rows_meta`: section offset, tokens, first output row) is built on the host and shipped with the
sections, so nothing is read back. Runs on CPU tensors under `TRITON_INTERPRET=1` (how the tests check it).
"""

from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, block_size, store_value, tl, triton

BLOCK = 2048  # elements per program on the GPU
META_FIELDS = 3  # per entry: section byte offset (a multiple of 4), tokens T, first output row

if HAS_TRITON:

    @triton.jit
    def _int8_rows_kernel(
        src,  # int8: every entry's section, each at a 16-byte aligned offset
        src32,  # the same bytes as fp32
        out,  # [2, N_rows * C] output dtype: the loader's rows of this layer
        meta,  # int64 [J, META_FIELDS]
        rows_total,  # N_rows * C
        channels,
        BLOCK_SIZE: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        kv = tl.program_id(1)
        m = meta + tl.program_id(2) * 3
        base = tl.load(m)
        tokens = tl.load(m + 1)
        row0 = tl.load(m + 2)
        n = tokens * channels
        e = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        live = e < n
        t = e // channels
        c = e % channels
        codes_at = base + 4 * (channels + tokens) + kv * n  # byte offset of this part's codes
        code = tl.load(src + codes_at + e, mask=live, other=0).to(tl.float32)
        scale_index = tl.where(kv == 0, c, channels + t)  # K: per channel, V: per token
        scale = tl.load(src32 + base // 4 + scale_index, mask=live, other=0.0)
        value = code * scale
        store_value(out + kv * rows_total + row0 * channels + e, value, live, OUT_BF16)


def decode_int8_rows_triton(
    src: torch.Tensor, meta: torch.Tensor, max_tokens: int, channels: int, out: torch.Tensor
) -> torch.Tensor:
    """Decode every entry of `meta` (int64 [J, META_FIELDS] on the device, see `Int8Codec.rows_meta`; none longer
    than `max_tokens`) from `src` (uint8 on the device) into its rows of `out` [2, N, H, D] (contiguous,
    H * D == channels) with one launch."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: decode with decode_int8_rows_torch, or pip install triton")
    if not out.is_contiguous() or out.shape[2] * out.shape[3] != channels:
        raise ValueError(f"out must be a contiguous [2, N, H, D] tensor with H * D = {channels}")
    block = block_size(BLOCK)
    bf16 = out.dtype == torch.bfloat16
    grid = (triton.cdiv(max_tokens * channels, block), 2, meta.shape[0])
    _int8_rows_kernel[grid](
        src.view(torch.int8),
        src.view(torch.float32) if src.numel() % 4 == 0 else src[: src.numel() // 4 * 4].view(torch.float32),
        out.view(torch.int16) if bf16 else out,
        meta,
        out.shape[1] * channels,
        channels,
        BLOCK_SIZE=block,
        OUT_BF16=bf16,
    )
    return out


def decode_int8_rows_torch(
    src: torch.Tensor, tokens: list[int], offsets: list[int], rows: list[int], channels: int, out: torch.Tensor
) -> torch.Tensor:
    """The kernel's reference in torch ops on `src`'s device: the same fp32 `code * scale`, entry by entry."""
    flat = out.view(2, out.shape[1], channels)
    for t, at, row in zip(tokens, offsets, rows):
        n_scales = 4 * (channels + t)
        scale_k = src[at : at + 4 * channels].view(torch.float32)  # [C]
        scale_v = src[at + 4 * channels : at + n_scales].view(torch.float32)  # [T]
        codes = src[at + n_scales : at + n_scales + 2 * t * channels].view(torch.int8).view(2, t, channels)
        x = codes.float()  # [2, T, C]
        x[0] *= scale_k[None, :]
        x[1] *= scale_v[:, None]
        flat[:, row : row + t] = x.to(out.dtype)
    return out
