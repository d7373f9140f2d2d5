"""Merged KV -> a transformers `DynamicCache` that `model.generate` accepts as is."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .loop import BlendResult


def to_dynamic_cache(result: BlendResult, num_tokens: int | None = None) -> DynamicCache:
    """A DynamicCache holding the first `num_tokens` rows of every layer (all rows by default).

    For `model.generate(input_ids, cache=cache)` (transformers 5; `past_key_values=` before it, deprecated
    since) pass `num_tokens = N - 1`: generate then
    computes the last prompt token itself and continues from there.
    """
    return DynamicCache(ddp_cache_data=result.prompt_kv(num_tokens))  # [1, H, n, D] per layer


def kv_tensor(result: BlendResult) -> torch.Tensor:
    """The merged KV in ragkv's layout: [2, L, N, H_kv, D]."""
    layers = result.prompt_kv()
    k = torch.stack([x[0].transpose(0, 1) for x, _ in layers])  # [L, N, H, D]
    v = torch.stack([x[0].transpose(0, 1) for _, x in layers])  # [L, N, H, D]
    return torch.stack([k, v])
