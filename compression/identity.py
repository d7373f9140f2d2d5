"""The identity codec: the stored dtype's raw bytes (fp16 / bf16 / fp32), one section per layer."""

from __future__ import annotations

import torch

from .layered import LayeredCodec


def tensor_bytes(x: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bf16 and fp8 included) on any device."""
    return x.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def tensor_from(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `tensor_bytes`: a tensor of `shape` read from `buf` (whose length must match)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(buf) != n:
        raise ValueError(f"expected {n} bytes for {dtype} {list(shape)}, got {len(buf)}")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).view(shape)


class IdentityCodec(LayeredCodec):
    """Raw tensor bytes as stored; lossless."""

    name = "identity"
    lossless = True

    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        return tensor_bytes(layer_kv)

    def decode_section(self, section, params, shape, stored, layer, num_layers, device) -> torch.Tensor:
        return tensor_from(section, stored, (2, *shape)).to(device)  # [2, T, H, D]
