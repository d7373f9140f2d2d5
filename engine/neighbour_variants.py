"""Neighbour variants (after FusionRAG): at ingestion, each new chunk's KV is also computed after the
chunks nearest to it by embedding, so a prompt that retrieves it with those neighbours before it finds
KV that has already seen them.

Opt-in (`IngestConfig.neighbour_variants = k`): for each chunk whose KV the run computed, the `k`
chunks of the namespace's index nearest to its text (itself excluded; the nearest last, next to it) are
placed before it after the attention sink, as one sequence, and its rows are stored as a variant
keyed by those neighbours (`storage/variants.py`, at most `IngestConfig.variant_limit` per chunk,
evicted by utility). No prompt template is known at ingestion, so these variants saw no prompt prefix:
cachecraft uses them by their overlap with the chunks before it (`blend/variant_choice.py`) but never
as exact. Removing a document removes them with its chunks (`forget_chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..chunk_cache import ChunkKey, ChunkKV, precompute
from ..retriever import Retriever
from ..storage.metadata import metadata_store
from ..storage.variants import store_variant


def neighbours(retriever: Retriever, key: ChunkKey, token_ids: Sequence[int], k: int) -> list:
    """The `k` indexed chunks nearest to this chunk's text (itself and duplicates of it excluded), nearest first."""
    text = retriever.model.tokenizer.decode(list(token_ids), skip_special_tokens=True)
    hits = [h for h in retriever.search(text, k + 1) if h.key != key]
    unique = {h.key: h for h in hits}
    return list(unique.values())[:k]


@torch.inference_mode()
def store_neighbour_variants(
    adapter, store, retriever: Retriever, chunks: dict[ChunkKey, Sequence[int]], k: int, limit: int
) -> list[ChunkKey]:
    """Compute and store each chunk of `chunks` (key -> token ids) after its `k` nearest neighbours;
    returns the variant keys stored."""
    if k < 1 or not chunks:
        return []
    meta = metadata_store(store)
    stored = []
    for key, ids in chunks.items():
        near = neighbours(retriever, key, ids, k)[::-1]  # the nearest last: right before the chunk
        if not near:
            continue
        context = [t for h in near for t in h.token_ids]
        whole = precompute(adapter, context + list(ids))  # rows after the attention sink
        kv = ChunkKV(whole.kv[:, :, len(context) :].contiguous(), pos0=whole.pos0 + len(context))
        preceding = [h.key for h in near]
        stored.append(store_variant(store, meta, key, preceding, kv, limit, compute_saved=len(context) + len(ids)))
    return stored
