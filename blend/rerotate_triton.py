"""The Triton kernel that re-rotates a layer's cached keys and writes them to their target rows, in one pass.

`rerotate_into(dst, keys, cos, sin, targets)` does what `dst[:, targets] = rerotate(keys, cos, sin)
.to(dst.dtype).transpose(0, 1)` does with about eight fp32 torch kernels, which on an H200 took 18 ms of a
20K-token blend of an 8B-shaped model (memory-bound on fp32 intermediates): one launch per layer reading
the keys and the cos/sin tables once and writing the rotated keys once. The arithmetic is the reference's
(fp32, `x1 * cos - x2 * sin`, `x2 * cos + x1 * sin`, one rounding to the buffer's dtype); a compiled kernel
may fuse a multiply-add (FMA), so the two can differ by one fp32 rounding before that cast. Used on CUDA
when triton is installed and head_dim / 2 is a power of two; tests run it under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is optional: the torch reference re-rotates everywhere
    HAS_TRITON = False

BLOCK_ROWS = 32

if HAS_TRITON:

    @triton.jit
    def _rerotate_kernel(
        keys,  # [Nc, H, D] any float dtype, contiguous
        cos,  # [Nc, D] fp32
        sin,  # [Nc, D] fp32
        targets,  # [Nc] int64: the row of dst each cached row goes to
        dst,  # [H, N, D] view: row stride D
        n_rows,
        heads,
        dst_head_stride,
        HALF: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        h = tl.program_id(1)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        live = (r < n_rows)[:, None]
        d = tl.arange(0, HALF)[None, :]  # [1, HALF]
        row = r.to(tl.int64)[:, None]
        src = keys + (row * heads + h) * (2 * HALF) + d
        x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
        table = row * (2 * HALF) + d
        c1 = tl.load(cos + table, mask=live, other=0.0)
        c2 = tl.load(cos + table + HALF, mask=live, other=0.0)
        s1 = tl.load(sin + table, mask=live, other=0.0)
        s2 = tl.load(sin + table + HALF, mask=live, other=0.0)
        t = tl.load(targets + r, mask=r < n_rows, other=0)[:, None]
        out = dst + h * dst_head_stride + t * (2 * HALF) + d
        tl.store(out, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=live)
        tl.store(out + HALF, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=live)


def kernel_fits(keys: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether `rerotate_into` can run here: triton, and head_dim / 2 a power of two; on CUDA tensors
    (or any tensors under TRITON_INTERPRET, which is how CPU tests run it)."""
    half = keys.shape[-1] // 2
    where = keys.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return HAS_TRITON and where and half >= 1 and half & (half - 1) == 0 and dst.stride(-1) == 1


def rerotate_into(
    dst: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, targets: torch.Tensor
) -> None:
    """Write `keys` [Nc, H, D] re-rotated by `cos`, `sin` [Nc, D] (fp32) into `dst` [H, N, D] at rows
    `targets` [Nc] (int64), in `dst`'s dtype: one kernel launch."""
    n, heads, dim = keys.shape
    if dst.stride(1) != dim or dst.stride(2) != 1:
        raise ValueError(f"dst must be [H, N, D] with contiguous rows, got strides {dst.stride()}")
    keys, cos, sin = keys.contiguous(), cos.contiguous(), sin.contiguous()
    grid = (triton.cdiv(n, BLOCK_ROWS), heads)
    _rerotate_kernel[grid](keys, cos, sin, targets, dst, n, heads, dst.stride(0), HALF=dim // 2, BLOCK_R=BLOCK_ROWS)
