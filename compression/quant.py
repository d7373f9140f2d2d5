"""Scaled 8-bit codecs: `int8` (symmetric) and `fp8` (float8_e4m3fn), K scaled per channel, V per token.

Per layer, K gets one scale per channel (head x head-dim, over the chunk's tokens: K outliers live in
channels) and V one per token (over all channels). Scales are fp32 in the section; decoding is torch
arithmetic on the target device.
"""

from __future__ import annotations

import numpy as np
import torch

from .identity import tensor_bytes, tensor_from
from .layered import CodecError, LayeredCodec

HAS_FP8 = hasattr(torch, "float8_e4m3fn")


def check_finite(x: torch.Tensor, codec: str) -> None:
    """Lossy codecs quantize against scales; NaN/inf would poison them, so refuse at the boundary."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{codec} encodes finite KV only; this chunk's KV holds NaN or inf")


class _ScaledCodec(LayeredCodec):
    """Shared layout: scale_k [C] fp32 | scale_v [T] fp32 | K codes [T, C] | V codes [T, C] (1 byte each)."""

    lossless = False
    device_decode = True
    encodes_on_device = True
    qmax: float
    code_dtype: torch.dtype

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of `x` already divided by its scale (|x| <= qmax)."""
        raise NotImplementedError

    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        check_finite(layer_kv, self.name)
        t = layer_kv.shape[1]
        x = layer_kv.float().reshape(2, t, -1)  # [2, T, C]
        scale_k = x[0].abs().amax(dim=0) / self.qmax  # [C]
        scale_v = x[1].abs().amax(dim=1) / self.qmax  # [T]
        scale_k = torch.where(scale_k > 0, scale_k, torch.ones_like(scale_k))
        scale_v = torch.where(scale_v > 0, scale_v, torch.ones_like(scale_v))
        codes_k = self.quantize(x[0] / scale_k[None, :])  # [T, C]
        codes_v = self.quantize(x[1] / scale_v[:, None])  # [T, C]
        return b"".join(tensor_bytes(a) for a in (scale_k, scale_v, codes_k, codes_v))

    def decode_section(self, section, params, shape, stored, layer, num_layers, device) -> torch.Tensor:
        t, h, d = shape
        c = h * d
        n_scales = 4 * (c + t)
        scale_k = tensor_from(section[: 4 * c], torch.float32, (c,)).to(device)  # [C]
        scale_v = tensor_from(section[4 * c : n_scales], torch.float32, (t,)).to(device)  # [T]
        codes = tensor_from(section[n_scales:], self.code_dtype, (2, t, c)).to(device)  # [2, T, C]
        out = codes.float()  # [2, T, C]
        out[0] *= scale_k[None, :]
        out[1] *= scale_v[:, None]
        return out.view(2, t, h, d)

    def device_layer(self, task, section: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantize on `section`'s device (the GPU): the same fp32 arithmetic as `decode_section`, so
        the same bits; `section` is the layer's bytes as a 1-D uint8 tensor (storage offset a multiple of 4)."""
        t, h, d = task.shape
        c = h * d
        n_scales = 4 * (c + t)
        if section.dtype != torch.uint8 or section.dim() != 1 or section.numel() != n_scales + 2 * t * c:
            raise ValueError(
                f"{self.name} section must be a 1-D uint8 tensor of {n_scales + 2 * t * c} bytes, "
                f"got {section.dtype} {tuple(section.shape)}"
            )
        scale_k = section[: 4 * c].view(torch.float32)  # [C]
        scale_v = section[4 * c : n_scales].view(torch.float32)  # [T]
        codes = section[n_scales:].view(self.code_dtype).view(2, t, c)  # [2, T, C]
        x = codes.float()  # [2, T, C]
        x[0] *= scale_k[None, :]
        x[1] *= scale_v[:, None]
        x = x.view(2, t, h, d)
        return x.to(task.dtype) if out is None else out.copy_(x)

    def max_abs_error(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Element-wise error bound for values `x` coded with `scale` (broadcastable)."""
        raise NotImplementedError


class Int8Codec(_ScaledCodec):
    """Symmetric int8: codes in [-127, 127]; |error| <= scale / 2 per element."""

    name = "int8"
    qmax = 127.0
    code_dtype = torch.int8
    rel_error = 0.02  # stated bound on ||x - x'|| / ||x|| for chunk KV (measured ~0.01 on SmolLM2)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x.round().clamp(-127, 127).to(torch.int8)  # [T, C]

    def max_abs_error(self, x, scale):
        return scale / 2

    def rows_meta(self, tasks, offsets, rows) -> np.ndarray:
        for task in tasks:
            t, h, d = task.shape
            if len(task.section) != 4 * (h * d + t) + 2 * t * h * d:
                raise CodecError(f"int8 section is {len(task.section)} bytes; a [{t}, {h}, {d}] layer needs more")
        table = [[at, task.shape[0], row] for task, at, row in zip(tasks, offsets, rows)]  # quant_triton.META_FIELDS
        return np.asarray(table, dtype=np.int64)

    def device_rows(self, tasks, src, offsets, out, rows, meta=None) -> None:
        """Every entry of the layer in one Triton launch on CUDA (`quant_triton`); the same fp32 arithmetic
        in torch ops elsewhere (or without `meta`), entry by entry."""
        # imported here, as packed does: triton decides at import whether kernels run interpreted (TRITON_INTERPRET)
        from .quant_triton import HAS_TRITON, decode_int8_rows_torch, decode_int8_rows_triton

        channels = tasks[0].shape[1] * tasks[0].shape[2]
        tokens = [t.shape[0] for t in tasks]
        if meta is not None and src.is_cuda and HAS_TRITON and out.is_contiguous():
            decode_int8_rows_triton(src, meta, max(tokens), channels, out)
        elif out.is_contiguous():
            decode_int8_rows_torch(src, tokens, list(offsets), list(rows), channels, out)
        else:
            super().device_rows(tasks, src, offsets, out, rows)


class Fp8Codec(_ScaledCodec):
    """float8_e4m3fn codes scaled so each group's max is 448; |error| <= |x|/16 + scale * 2^-10."""

    name = "fp8"
    qmax = 448.0
    code_dtype = torch.float8_e4m3fn if HAS_FP8 else torch.uint8
    rel_error = 0.05  # 3 mantissa bits: per-element relative rounding error <= 2^-4

    def __init__(self) -> None:
        if not HAS_FP8:
            raise ValueError(f"fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; use int8")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-448, 448).to(torch.float8_e4m3fn)  # [T, C]

    def max_abs_error(self, x, scale):
        return x.abs() / 16 + scale * 2.0**-10
