"""Chunk metadata for an evaluated sample, recorded before its strategies run (what `cachecraft` reads).

Cache-Craft learns a chunk's metadata when the chunk was used in an earlier prompt. An eval sample's
chunks are new, so a context pass over the same chunks in another order stands in for that earlier
prompt: `reversed` (default: every chunk sees different neighbours before it), `same` (the evaluated
order: an upper bound, the metadata comes from this very prompt) or `none` (nothing recorded: every
chunk takes cachecraft's query-aware fallback).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..blend.chunk_metadata import record_context
from ..engine.engine import Engine
from ..storage.metadata import metadata_store

ORDERS = ("reversed", "same", "none")


def record_sample_context(engine: Engine, question: str, chunks: Sequence[Sequence[int]], order: str) -> None:
    """Record each chunk's metadata from a context pass over `chunks` in `order`."""
    if order not in ORDERS:
        raise ValueError(f"unknown context order {order!r}; accepted: {', '.join(ORDERS)}")
    if order == "none" or not chunks:
        return
    seq = list(range(len(chunks)))[::-1] if order == "reversed" else list(range(len(chunks)))
    ordered = [list(chunks[i]) for i in seq]
    keys, _, _ = engine.ensure_cached(ordered)
    plan = engine.plan(question, ordered)
    with engine.store.pinned(keys):
        found = engine.store.get_layered_many(keys)
        if any(kv is None for kv in found):  # evicted or damaged since ensure_cached: nothing to record from
            return
        sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, found)]
        record_context(engine.model, plan, sources, keys, metadata_store(engine.store))
