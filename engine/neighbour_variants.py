"""Neighbour variants (after FusionRAG): each chunk's KV also computed after the chunks nearest to it by
embedding, so that in any prompt its KV has already seen related passages.

Chunk KV computed after the prompt prefix alone has seen no passage; in a prompt, every chunk follows
others, and the related ones are what its tokens would have attended to. Computed after its `k` nearest
chunks of the corpus (the nearest last, right before it; one sequence after the engine's lead-in, the
prompt template's fixed prefix), a chunk's KV is much closer to its rows in a full prefill of a prompt
that retrieves it, whether or not those neighbours are in that prompt: on 8 10-passage MuSiQue prompts,
neighbours from a corpus of 1,255 passages, the default focus fusion's kl_mean fell from 0.047 to 0.008
(docs/BENCHMARKS.md, "Chunk KV that saw its neighbours").

Stored as a variant keyed by the prompt prefix's key and the neighbours (`storage/variants.py`, at most
`variant_limit` per chunk, evicted by utility), beside the base entry: `focus` loads it
(`blend/variant_choice.py: choose_context`), cachecraft by its overlap with the chunks before it.
Removing a document removes its variants (`forget_chunks`). Computed at ingestion
(`IngestConfig.neighbour_variants`, neighbours from the namespace's index) or for chunks given directly
(`Engine.store_neighbour_variants`, neighbours from a corpus given with them: what `ragkv eval` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..chunk_cache import ChunkKey, ChunkKV, packs, precompute_many
from ..retriever import Retriever
from ..storage.metadata import metadata_store
from ..storage.variants import store_variant, variant_key
from .context_pass import prefix_ids_key


@dataclass(frozen=True)
class Neighbour:
    """A chunk placed before another when its neighbour variant is computed."""

    key: ChunkKey
    token_ids: tuple[int, ...]


# finder(key, token_ids, k) -> the k nearest chunks, nearest first (the chunk itself excluded)
Finder = Callable[[ChunkKey, Sequence[int], int], list[Neighbour]]


def index_neighbours(retriever: Retriever) -> Finder:
    """Neighbours from a namespace's index: the chunks nearest to a chunk's text."""

    def find(key: ChunkKey, token_ids: Sequence[int], k: int) -> list[Neighbour]:
        text = retriever.model.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        hits = [h for h in retriever.search(text, k + 1) if h.key != key]
        unique = {h.key: Neighbour(h.key, tuple(h.token_ids)) for h in hits}
        return list(unique.values())[:k]

    return find


def corpus_neighbours(keys: Sequence[ChunkKey], chunks: Sequence[Sequence[int]], vectors: np.ndarray) -> Finder:
    """Neighbours from a corpus held in memory: `chunks` (token ids) under `keys`, with unit `vectors`
    [C, dim] from the retriever's embedder; a chunk is found by its key."""
    row = {key: i for i, key in enumerate(keys)}

    def find(key: ChunkKey, token_ids: Sequence[int], k: int) -> list[Neighbour]:
        order = np.argsort(-(vectors @ vectors[row[key]]), kind="stable")
        near = [Neighbour(keys[j], tuple(chunks[j])) for j in order if keys[j] != key]
        return list({n.key: n for n in near}.values())[:k]

    return find


@torch.inference_mode()
def store_neighbour_variants(
    adapter,
    store,
    find: Finder,
    chunks: dict[ChunkKey, Sequence[int]],
    k: int,
    limit: int,
    namespace: str,
    lead_in: Sequence[int] | None = None,
    separator: Sequence[int] = (),
    max_tokens_per_pass: int = 4096,
) -> list[ChunkKey]:
    """Compute and store each chunk of `chunks` (key -> token ids) after `lead_in` (None: the model's
    sink) and its `k` nearest neighbours (`find`), each followed by `separator` as in a prompt, packed
    several per pass; keyed by the prompt prefix's key of `lead_in` in `namespace` and the neighbours,
    so that a prompt whose prefix and chunks before it are those finds it exact. Returns the variant
    keys stored (a variant already held is not computed again)."""
    if k < 1 or not chunks:
        return []
    prefix = prefix_ids_key(adapter, lead_in, namespace) if lead_in else None
    meta = metadata_store(store)
    jobs = []  # (key, neighbours placed before it, nearest last)
    for key, ids in chunks.items():
        near = find(key, ids, k)[::-1]
        if near and store.lookup([variant_key(key, [n.key for n in near], prefix)])[0] is None:  # held: kept
            jobs.append((key, near))
    stored = []
    lengths = [sum(len(n.token_ids) for n in near) + len(chunks[key]) for key, near in jobs]
    for pack in packs(lengths, max_tokens_per_pass):  # computed and stored a pass at a time
        group = [jobs[i] for i in pack]
        contexts = [[t for n in near for t in (*n.token_ids, *separator)] for _, near in group]
        sequences = [context + list(chunks[key]) for context, (key, _) in zip(contexts, group)]
        computed = precompute_many(adapter, sequences, max_tokens_per_pass, lead_in)  # each after the lead-in
        for (key, near), context, whole in zip(group, contexts, computed):
            kv = ChunkKV(whole.kv[:, :, len(context) :].contiguous(), pos0=whole.pos0 + len(context))
            cost = len(context) + len(chunks[key])
            stored.append(store_variant(store, meta, key, [n.key for n in near], kv, limit, cost, prefix))
    return stored
