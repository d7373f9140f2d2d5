"""The identity codec: the stored dtype's raw bytes, laid out layer by layer."""

from __future__ import annotations

import numpy as np
import torch

from ..chunk_cache import ChunkKV
from .codec import Codec, EncodedKV

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class IdentityCodec(Codec):
    """Raw tensor bytes (fp16 / bf16 / fp32 as stored); lossless."""

    name = "identity"
    lossless = True

    def encode(self, kv: ChunkKV) -> EncodedKV:
        dtype = str(kv.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"identity codec stores {', '.join(_DTYPES)}; got {dtype}")
        layers = kv.kv.detach().cpu().transpose(0, 1).contiguous()  # [L, 2, T, H, D]
        raw = layers.view(torch.uint8).numpy().tobytes() if dtype == "bfloat16" else layers.numpy().tobytes()
        meta = {"shape": list(kv.kv.shape), "dtype": dtype, "pos0": kv.pos0}
        return EncodedKV(self.name, raw, meta)

    def decode(self, enc: EncodedKV, device="cpu", dtype=None) -> ChunkKV:
        shape = enc.meta["shape"]
        layers = torch.stack([self.decode_layer(enc, i) for i in range(shape[1])], dim=1)  # [2, L, T, H, D]
        return ChunkKV(layers.to(device=device, dtype=dtype), enc.meta["pos0"])

    def decode_layer(self, enc: EncodedKV, layer: int, device="cpu", dtype=None) -> torch.Tensor:
        _, num_layers, t, h, d = enc.meta["shape"]
        stored = _DTYPES[enc.meta["dtype"]]
        per_layer = 2 * t * h * d * torch.tensor([], dtype=stored).element_size()
        view = np.frombuffer(enc.payload, dtype=np.uint8, count=per_layer, offset=layer * per_layer)
        out = torch.frombuffer(bytearray(view), dtype=stored).view(2, t, h, d)  # [2, T, H, D]
        return out.to(device=device, dtype=dtype or stored)
