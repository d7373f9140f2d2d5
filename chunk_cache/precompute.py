"""Precompute a chunk's KV once: one chunk at a time, or many packed into one forward pass.

Every chunk is computed after the model's attention-sink context (`model.sink_ids`, e.g. BOS) so
that its first token is not itself treated as a sink; the sink rows are dropped and the chunk's
keys start at `pos0 = len(sink_ids)`. Prepacking puts several `[sink + chunk]` sequences in one pass
with a block-diagonal causal mask and positions restarting per sequence; it equals one-by-one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .kv import ChunkKV


class KVModel(Protocol):
    """The model side precompute needs (implemented by `ragkv.adapters.ModelAdapter`)."""

    fingerprint: str
    tokenizer_fingerprint: str
    sink_ids: tuple[int, ...]

    def forward_kv(
        self, ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All layers' K/V of `ids` [T]: [2, L, T, H_kv, D]; `segments` [T] makes the mask block-diagonal."""
        ...


def precompute(model: KVModel, token_ids: Sequence[int]) -> ChunkKV:
    """KV of one chunk, computed after the sink context."""
    return precompute_many(model, [token_ids], max_tokens_per_pass=0)[0]


def precompute_many(model: KVModel, chunks: Sequence[Sequence[int]], max_tokens_per_pass: int = 4096) -> list[ChunkKV]:
    """KV of many chunks, packed greedily into passes of at most `max_tokens_per_pass` tokens.

    A chunk longer than the budget gets a pass of its own; `max_tokens_per_pass=0` means one
    chunk per pass (no packing).
    """
    sink = list(model.sink_ids)
    out: list[ChunkKV | None] = [None] * len(chunks)
    for batch in _packs([len(sink) + len(c) for c in chunks], max_tokens_per_pass):
        seqs = [sink + [int(t) for t in chunks[i]] for i in batch]
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)  # [T]
        positions = torch.cat([torch.arange(len(s)) for s in seqs])  # [T], restarting per chunk
        segments = torch.cat([torch.full((len(s),), n) for n, s in enumerate(seqs)])  # [T]
        kv = model.forward_kv(ids, positions, segments if len(seqs) > 1 else None)  # [2, L, T, H, D]
        start = 0
        for i, s in zip(batch, seqs):
            out[i] = ChunkKV(kv[:, :, start + len(sink) : start + len(s)].clone(), pos0=len(sink))
            start += len(s)
    assert all(o is not None for o in out), "every chunk must be packed exactly once"
    return out  # type: ignore[return-value]


def _packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy packing of sequence indices, in order, into groups of at most `budget` tokens."""
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs
