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


def query_attention(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, query_start: int, scale: float
) -> torch.Tensor:
    """Attention mass [S] each active token receives from the query tokens (rows >= `query_start`),
    summed over query tokens and heads; q [S, H_q, D], k [S, H_kv, D] are the active tokens' fresh
    projections at this layer and `rows` [S] their sorted prompt rows."""
    is_query = rows >= query_start  # [S]
    if not bool(is_query.any()):
        return torch.zeros(rows.shape[0], device=q.device)
    group = q.shape[1] // k.shape[1]
    qq = q[is_query].float().transpose(0, 1)  # [H_q, Qn, D]
    kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H_q, S, D]
    scores = qq @ kk.transpose(1, 2) * scale  # [H_q, Qn, S]
    causal = rows[None, :] <= rows[is_query][:, None]  # [Qn, S]
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(dim=-1).sum(dim=(0, 1))  # [S]


def keep_top(is_cached: torch.Tensor, deviation: torch.Tensor, budget: int) -> torch.Tensor:
    """[S] bool: every fresh token, plus the `budget` cached tokens with the largest deviation.

    No host read-back: fresh tokens rank last (-inf), so when the budget exceeds the cached tokens the
    extra picks are fresh tokens, which are kept anyway."""
    keep = ~is_cached
    budget = min(budget, is_cached.shape[0])
    if budget > 0:
        ranked = deviation.float().masked_fill(keep, float("-inf"))  # [S]
        keep = keep.index_fill(0, ranked.topk(budget).indices, True)
    return keep


def budget(fraction: float, num_cached: int) -> int:
    """How many of `num_cached` chunk tokens a fraction keeps (rounded up so any ratio > 0 keeps one)."""
    return min(num_cached, math.ceil(fraction * num_cached - 1e-9))
