"""The Triton re-rotation kernel (`blend/rerotate_triton.py`) against the torch reference, under
TRITON_INTERPRET=1 on CPU (compiled on CUDA when there is one)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernel module is first imported: interpret on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ragkv.blend.rerotate import rerotate, rotation  # noqa: E402
from ragkv.blend.rerotate_triton import kernel_fits, rerotate_into  # noqa: E402


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("rows,heads,dim", [(37, 2, 16), (5, 3, 64), (70, 1, 128)])
def test_kernel_equals_the_torch_reference(dtype, rows, heads, dim):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(rows)
    keys = torch.randn(rows, heads, dim, generator=g).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    cos, sin = rotation(torch.randint(-500, 500, (rows,), generator=g), inv_freq)
    targets = torch.randperm(rows + 9, generator=g)[:rows]  # scattered, gaps left untouched
    dst = torch.full((heads, rows + 9 + 4, dim), 3.0, dtype=dtype)[:, : rows + 9]  # a [H, N, D] view
    want = dst.clone()
    want[:, targets] = rerotate(keys, cos, sin).to(dtype).transpose(0, 1)
    dst, keys, cos, sin, targets = (x.to(device) for x in (dst, keys, cos, sin, targets))
    assert kernel_fits(keys, dst)
    rerotate_into(dst, keys, cos, sin, targets)
    got = dst.cpu()
    if dtype == torch.float32:  # one fp32 rounding apart at most (a compiled kernel may fuse an FMA)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # the interpreter rounds bf16 by truncation: one unit in the last place of the stored dtype
        torch.testing.assert_close(
            got.float(), want.float(), rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=1e-3
        )
    untouched = torch.ones(rows + 9, dtype=torch.bool)
    untouched[targets.cpu()] = False
    assert (got[:, untouched] == 3.0).all()


def test_kernel_refuses_what_it_cannot_do():
    keys = torch.randn(4, 2, 12)  # head_dim / 2 = 6: not a power of two
    assert not kernel_fits(keys, torch.zeros(2, 4, 12))
    with pytest.raises(ValueError, match="contiguous rows"):
        rerotate_into(
            torch.zeros(2, 12, 4).transpose(1, 2),
            torch.randn(4, 2, 4),
            torch.ones(4, 4),
            torch.zeros(4, 4),
            torch.arange(4),
        )
