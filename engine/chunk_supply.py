"""ChunkSupply: chunk KV for the Engine's stages: keys, which tier holds each, and the misses computed
(packed several per pass) once across the sidecars sharing a Redis tier.

Computed KV goes to the first tier at once and is copied to the disk tier off the request path
(write-behind). An entry that vanished or failed its checksum between lookup and read is recomputed
through the same compute-once path, so two sidecars that lose one entry at once compute it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..blend import BlendPlan
from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV, chunk_key, precompute_many
from ..models import ModelAdapter
from ..storage import TieredStore
from ..storage.lease import compute_once


@dataclass
class Lookup:
    """Where a prompt's chunks are: keys in prompt order, hits per tier, the missing ones (a repeated
    chunk once) and the misses counting repeats."""

    keys: list[ChunkKey] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    missing: dict[ChunkKey, Sequence[int]] = field(default_factory=dict)
    misses: int = 0

    def count_shared(self, shared: dict[ChunkKey, str]) -> None:
        """Chunks another sidecar computed while this one waited count as hits of their tier."""
        for k in self.keys:
            if k in shared:
                self.hits[shared[k]] = self.hits.get(shared[k], 0) + 1
                self.misses -= 1


class ChunkSupply:
    """Looks chunks up in the store and computes the misses."""

    def __init__(self, model: ModelAdapter, store: TieredStore, prepack_tokens: int) -> None:
        self.model = model
        self.store = store
        self.prepack_tokens = prepack_tokens

    def lookup(self, chunks: Sequence[Sequence[int]], namespace: str) -> Lookup:
        """Keys and tiers of `chunks` (no I/O, no precompute); the store's stats count the misses."""
        found = Lookup(keys=[chunk_key(self.model, c, namespace) for c in chunks])
        for key, chunk, tier in zip(found.keys, chunks, self.store.lookup(found.keys)):
            if tier is None:
                found.missing[key] = chunk
                found.misses += 1
            else:
                found.hits[tier] = found.hits.get(tier, 0) + 1
        self.store.note_misses(found.misses)  # cache stats agree with the answer's misses
        return found

    def precompute(self, missing: dict[ChunkKey, Sequence[int]]) -> dict[ChunkKey, str]:
        """Compute and store the KV of `missing` chunks, each once across sidecars, written behind to
        the disk tier; returns the keys another sidecar computed meanwhile -> their tier."""
        if not missing:
            return {}
        compute = lambda c: precompute_many(self.model, c, self.prepack_tokens)  # noqa: E731
        return compute_once(self.store, missing, compute, write_behind=True)

    def ensure(self, chunks: Sequence[Sequence[int]], namespace: str) -> Lookup:
        """Look `chunks` up and compute the misses."""
        found = self.lookup(chunks, namespace)
        found.count_shared(self.precompute(found.missing))
        return found

    def recompute_vanished(
        self, keys: Sequence[ChunkKey], chunks: Sequence[Sequence[int]], found: list[LayeredKV | None]
    ) -> int:
        """Fill the `None`s of `found` (entries gone or corrupt since lookup) through the compute-once
        path; returns how many were computed here (another sidecar's count as hits)."""
        gone = {keys[i]: chunks[i] for i, kv in enumerate(found) if kv is None}
        shared = self.precompute(gone)
        recomputed = 0
        for i, kv in enumerate(found):
            if kv is None:
                found[i] = self.store.get_layered(keys[i])
                recomputed += keys[i] not in shared
            if found[i] is None:  # not even the first tier kept it (too small, or gone again): use it unstored
                found[i] = precompute_many(self.model, [chunks[i]])[0]
        return recomputed

    def cached_prefix(self, plan: BlendPlan, namespace: str) -> tuple[ChunkKey, LayeredKV | None]:
        """Exact-prefix reuse: the key of the prompt's prefix (its template) and its cached KV (None: a miss)."""
        ids = plan.input_ids[: plan.prefix_len].tolist()
        key = ChunkKey.of(self.model.fingerprint + ":prefix", self.model.tokenizer_fingerprint, ids, namespace)
        return key, self.store.get_layered(key)

    def compute_prefix(self, plan: BlendPlan, key: ChunkKey) -> LayeredKV:
        """The prefix's KV from position 0, stored under `key`."""
        kv = ChunkKV(self.model.forward_kv(plan.input_ids[: plan.prefix_len], torch.arange(plan.prefix_len)), pos0=0)
        self.store.put(key, kv)
        return kv
