"""Token selection for CacheBlend: rank cached tokens by how far their fresh K/V deviate from the
cached K/V at a check layer, and keep the top fraction (fresh tokens are always kept)."""

from __future__ import annotations

import math

import torch


def kv_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor, kind: str = "v"
) -> torch.Tensor:
    """Squared L2 deviation per token [S] between fresh and cached rows [S, H_kv, D]."""
    dev = torch.zeros(fresh_k.shape[0], dtype=torch.float32, device=fresh_k.device)  # [S]
    if kind in ("k", "kv"):
        dev += (fresh_k.float() - cached_k.float()).pow(2).sum(dim=(1, 2))
    if kind in ("v", "kv"):
        dev += (fresh_v.float() - cached_v.float()).pow(2).sum(dim=(1, 2))
    return dev


def keep_top(is_cached: torch.Tensor, deviation: torch.Tensor, budget: int) -> torch.Tensor:
    """[S] bool: every fresh token, plus the `budget` cached tokens with the largest deviation."""
    keep = ~is_cached
    cached_idx = is_cached.nonzero().flatten()  # [C]
    budget = min(budget, cached_idx.numel())
    if budget > 0:
        top = deviation[cached_idx].topk(budget).indices  # [budget]
        keep[cached_idx[top]] = True
    return keep


def budget(fraction: float, num_cached: int) -> int:
    """How many of `num_cached` chunk tokens a fraction keeps (rounded up so any ratio > 0 keeps one)."""
    return min(num_cached, math.ceil(fraction * num_cached - 1e-9))
