"""Precompute a chunk's KV once: one chunk at a time, or many packed into one forward pass.

Every chunk is computed after a lead-in, so that its first token is not itself treated as a sink: by
default the model's attention-sink context (`model.sink_ids`, e.g. BOS); with `lead_in` a prompt
template's fixed prefix (chat template + instruction, the shared prefix of APE), so that the cached KV
already "knows" it is a passage of such a prompt. The lead-in rows are dropped and the chunk's keys start
at `pos0 = len(lead_in)`. A lead-in other than the sink is part of the chunk's key (`chunk_key`, key.py).
The lead-in's KV is computed once per call (one forward over the lead-in) and every chunk's pass attends
to it as a shared past, so a chunk costs its own tokens only; it equals computing `[lead-in + chunk]` in
one sequence. Prepacking puts several chunks in one pass, each attending to the lead-in and causally to
itself only (block-diagonal), positions continuing from the lead-in's length; it equals one-by-one.
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
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor | None = None,
        past: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All layers' K/V of `ids` [T]: [2, L, T, H_kv, D]; `segments` [T] makes the mask block-diagonal;
        `past` [2, L, P, H_kv, D] (a lead-in's `forward_kv`) is a prefix every segment attends to in full."""
        ...


def precompute(model: KVModel, token_ids: Sequence[int], lead_in: Sequence[int] | None = None) -> ChunkKV:
    """KV of one chunk, computed after `lead_in` (None: the model's sink)."""
    return precompute_many(model, [token_ids], max_tokens_per_pass=0, lead_in=lead_in)[0]


def precompute_many(
    model: KVModel,
    chunks: Sequence[Sequence[int]],
    max_tokens_per_pass: int = 4096,
    lead_in: Sequence[int] | None = None,
) -> list[ChunkKV]:
    """KV of many chunks, each computed after `lead_in` (None: the model's sink), packed greedily into
    passes of at most `max_tokens_per_pass` chunk tokens. The lead-in's KV is computed once, up front.

    A chunk longer than the budget gets a pass of its own; `max_tokens_per_pass=0` means one
    chunk per pass (no packing).
    """
    lead = [int(t) for t in (model.sink_ids if lead_in is None else lead_in)]
    p = len(lead)
    past = model.forward_kv(torch.tensor(lead, dtype=torch.long), torch.arange(p)) if p else None  # [2, L, P, H, D]
    out: list[ChunkKV | None] = [None] * len(chunks)
    for batch in packs([len(c) for c in chunks], max_tokens_per_pass):
        seqs = [[int(t) for t in chunks[i]] for i in batch]
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)  # [T]
        positions = torch.cat([torch.arange(p, p + len(s)) for s in seqs])  # [T], after the lead-in per chunk
        segments = torch.cat([torch.full((len(s),), n) for n, s in enumerate(seqs)])  # [T]
        kv = model.forward_kv(ids, positions, segments if len(seqs) > 1 else None, past)  # [2, L, T, H, D]
        start = 0
        for i, s in zip(batch, seqs):
            out[i] = ChunkKV(kv[:, :, start : start + len(s)].clone(), pos0=p)
            start += len(s)
    assert all(o is not None for o in out), "every chunk must be packed exactly once"
    return out  # type: ignore[return-value]


def packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy packing of sequence indices, in order, into groups of at most `budget` tokens."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        out.append(current)
    return out
