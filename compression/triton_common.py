"""What the Triton kernels of this package share: the optional import, the block size under the
interpreter, and the store that rounds to bf16 by integer arithmetic (so the interpreter, which would
truncate, and the compiled kernel write the same bits). Imported only by the kernel modules, which the
codecs import lazily: triton decides at import whether kernels run interpreted (`TRITON_INTERPRET=1`)."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is optional: without it every device decodes with torch ops
    triton = tl = None
    HAS_TRITON = False

INTERPRETED_BLOCK = 1 << 14  # under TRITON_INTERPRET each program is a numpy pass: fewer, larger ones


def block_size(compiled: int) -> int:
    """Elements per program: `compiled` on the GPU, INTERPRETED_BLOCK under the interpreter."""
    return INTERPRETED_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else compiled


if HAS_TRITON:

    @triton.jit
    def store_value(at, value, live, OUT_BF16: tl.constexpr):
        """Store fp32 `value` at `at` (masked by `live`) in the output's dtype; bf16 outputs (viewed as int16)
        are rounded to nearest even by hand: the same bits compiled or interpreted (values are finite)."""
        if OUT_BF16:
            b = value.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(at, b.to(tl.uint16).to(tl.int16, bitcast=True), mask=live)
        else:
            tl.store(at, value.to(at.dtype.element_ty), mask=live)
