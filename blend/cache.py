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
    n = result.keys[0].shape[2] if num_tokens is None else num_tokens
    layers = [(k[:, :, :n], v[:, :, :n]) for k, v in zip(result.keys, result.values)]  # [1, H, n, D] each
    return DynamicCache(ddp_cache_data=layers)


def kv_tensor(result: BlendResult) -> torch.Tensor:
    """The merged KV in ragkv's layout: [2, L, N, H_kv, D]."""
    k = torch.stack([x[0].transpose(0, 1) for x in result.keys])  # [L, N, H, D]
    v = torch.stack([x[0].transpose(0, 1) for x in result.values])  # [L, N, H, D]
    return torch.stack([k, v])
