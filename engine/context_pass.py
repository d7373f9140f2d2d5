"""The context pass: what cachecraft learns from a prompt whose chunks may recur.

`context_pass` records, for the chunks of one prompt in their order, (1) their chunk metadata (CCI,
token ranking, preceding keys: `blend/chunk_metadata.py`, a scout pass over the cached rows) and (2)
with `variants > 0`, each chunk's KV as computed in this context: a full prefill of the prompt (the
model's own forward, `full_prefill`) gives every chunk's exact in-context rows, and each chunk is
stored as a variant keyed by the prompt prefix and its preceding chunks (`storage/variants.py`, at
most `variants` per chunk, evicted by utility; the first chunk's variant is its KV after the prefix).
A later prompt with the same prefix and the same chunks in the same order then loads exact variants
and recomputes none of their tokens (`blend/cachecraft.py`). `store_in_context` is the storing half,
shared with the serving path (engine/serving_variants.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..blend import BlendPlan, BlendResult
from ..blend.chunk_metadata import record_context
from ..chunk_cache import ChunkKey, ChunkKV
from ..models import ModelAdapter
from ..storage.metadata import ChunkMetadata, metadata_store
from ..storage.variants import store_variant
from .full_prefill import full_prefill


@dataclass(frozen=True)
class ContextPassReport:
    """What one context pass recorded."""

    keys: list[ChunkKey]  # the chunks' base keys, in prompt order
    metadata: list[ChunkMetadata]  # per chunk (empty if an entry vanished before the pass)
    variants: list[ChunkKey]  # the variant keys stored, one per chunk


def in_context_kv(result: BlendResult, start: int, end: int) -> ChunkKV:
    """Rows [start, end) of a prefill's KV as a ChunkKV: keys rotated at positions start..end-1, so
    `pos0 = start` (the convention of every entry: the blend re-rotates by target - pos0)."""
    keys = torch.stack([k[0, :, start:end].transpose(0, 1) for k, _ in result.buffers])  # [L, T, H, D]
    values = torch.stack([v[0, :, start:end].transpose(0, 1) for _, v in result.buffers])
    return ChunkKV(torch.stack([keys, values]).contiguous(), pos0=start)  # [2, L, T, H, D]


def prefix_key(model: ModelAdapter, plan: BlendPlan, namespace: str) -> ChunkKey:
    """The key of a prompt's prefix (its token ids before the first chunk): what a variant was computed after."""
    return prefix_ids_key(model, plan.input_ids[: plan.prefix_len].tolist(), namespace)


def prefix_ids_key(model: ModelAdapter, prefix: Sequence[int], namespace: str) -> ChunkKey:
    """`prefix_key` of a prefix given by its token ids (a lead-in: the prefix chunk KV is computed after)."""
    return ChunkKey.of(model.fingerprint + ":prefix", model.tokenizer_fingerprint, list(prefix), namespace)


def store_in_context(
    store, plan: BlendPlan, keys: Sequence[ChunkKey], exact: BlendResult, prefix: ChunkKey, limit: int, chunks=None
) -> list[ChunkKey]:
    """Store the rows of the chunks `chunks` (indices; default all) of `exact` (a prefill of `plan` whose
    chunk rows are exact: the full prefill's) as variants after `prefix` and their preceding chunks."""
    meta = metadata_store(store)
    stored = []
    for i in range(len(keys)) if chunks is None else chunks:
        start, end = plan.chunk_spans[i]
        kv = in_context_kv(exact, start, end)
        stored.append(store_variant(store, meta, keys[i], keys[:i], kv, limit, compute_saved=end, prefix=prefix))
    return stored


@torch.inference_mode()
def context_pass(
    engine, question: str, chunks: Sequence[Sequence[int]], namespace: str | None = None, variants: int | None = None
) -> ContextPassReport:
    """Record metadata and (with `variants` > 0; default: the engine's `blend.craft_variants`) the
    in-context KV variants of `chunks` (token ids, in prompt order) under `question`."""
    limit = engine.config.blend.craft_variants if variants is None else variants
    keys, _, _ = engine.ensure_cached(chunks, namespace)
    plan: BlendPlan = engine.plan(question, chunks)
    meta = metadata_store(engine.store)
    recorded: list[ChunkMetadata] = []
    with engine.store.pinned(keys):
        found = engine.store.get_layered_many(keys)
        if all(kv is not None for kv in found):  # else evicted or damaged since ensure_cached: no metadata
            sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, found)]
            recorded = record_context(engine.model, plan, sources, keys, meta)
    stored: list[ChunkKey] = []
    if limit > 0 and keys:
        prefix = prefix_key(engine.model, plan, namespace or engine.config.namespace)
        stored = store_in_context(engine.store, plan, keys, full_prefill(engine.model, plan), prefix, limit)
    return ContextPassReport(keys, recorded, stored)
