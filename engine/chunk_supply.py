"""ChunkSupply: chunk KV for the Engine's stages: keys, which tier holds each, and the misses computed
(packed several per pass) once across the sidecars sharing a Redis tier.

Chunk KV is computed after the supply's `lead_in` (the prompt template's fixed prefix by default, else
the model's attention sink: `chunk_context`), and keyed by it (`chunk_key`): KV that already saw the
prompt's instruction, and for the first chunk of a prompt exactly the full prefill's rows.

Computed KV goes to the first tier at once and is copied to the disk tier off the request path
(write-behind). An entry that vanished or failed its checksum between lookup and read is recomputed
through the same compute-once path, so two sidecars that lose one entry at once compute it once.
Several prompts (a batch) are looked up in one store call (`lookup_many`) and their misses computed
together (`ensure_many`): a chunk two prompts of the batch miss is computed once and counted as alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..blend import BlendPlan
from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV, LeadIn, precompute_many
from ..models import ModelAdapter
from ..storage import TieredStore
from ..storage.lease import compute_once


@dataclass
class Lookup:
    """Where a prompt's chunks are: keys in prompt order, hits per tier, the missing ones (a repeated
    chunk once), the misses counting repeats, and (in a batch) the chunks an earlier prompt of the same
    batch misses, computed once for both (`pending`: they count as hits of the tier they land in)."""

    keys: list[ChunkKey] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    missing: dict[ChunkKey, Sequence[int]] = field(default_factory=dict)
    misses: int = 0
    pending: list[ChunkKey] = field(default_factory=list)  # a key once per occurrence

    def count_shared(self, shared: dict[ChunkKey, str]) -> None:
        """Chunks another sidecar computed while this one waited count as hits of their tier."""
        for k in self.keys:
            if k in shared and k in self.missing:
                self.hits[shared[k]] = self.hits.get(shared[k], 0) + 1
                self.misses -= 1

    def count_pending(self, tiers: dict[ChunkKey, str | None]) -> None:
        """The `pending` chunks, computed for an earlier prompt of the batch, count as hits of the tier
        that now holds them (`tiers`; one no tier kept is left to the load, which recomputes it)."""
        for k in self.pending:
            if tiers.get(k) is not None:
                self.hits[tiers[k]] = self.hits.get(tiers[k], 0) + 1


class ChunkSupply:
    """Looks chunks up in the store and computes the misses."""

    def __init__(
        self, model: ModelAdapter, store: TieredStore, prepack_tokens: int, lead_in: LeadIn | None = None
    ) -> None:
        self.model = model
        self.store = store
        self.prepack_tokens = prepack_tokens
        self.lead_in = lead_in or LeadIn()  # what chunk KV is computed after (shared with the retrievers)

    def key(self, chunk: Sequence[int], namespace: str) -> ChunkKey:
        """The store key of `chunk` (token ids) computed after this supply's lead-in."""
        return self.lead_in.key(self.model, chunk, namespace)

    def compute(self, chunks: Sequence[Sequence[int]], max_tokens_per_pass: int | None = None) -> list[ChunkKV]:
        """The KV of `chunks` after this supply's lead-in, packed into passes (not stored)."""
        budget = self.prepack_tokens if max_tokens_per_pass is None else max_tokens_per_pass
        return precompute_many(self.model, chunks, budget, self.lead_in.ids)

    def lookup(self, chunks: Sequence[Sequence[int]], namespace: str) -> Lookup:
        """Keys and tiers of `chunks` (no I/O, no precompute); the store's stats count the misses."""
        return self.lookup_many([(chunks, namespace)])[0]

    def lookup_many(self, prompts: Sequence[tuple[Sequence[Sequence[int]], str]]) -> list[Lookup]:
        """`lookup` of several prompts (chunks, namespace) with one store lookup: a chunk that an earlier
        prompt of the batch misses is `pending` in the later ones, not missed twice."""
        found = [Lookup(keys=[self.key(c, ns) for c in chunks]) for chunks, ns in prompts]
        tiers = iter(self.store.lookup([k for f in found for k in f.keys]))
        earlier: set[ChunkKey] = set()
        for f, (chunks, _) in zip(found, prompts):
            for key, chunk, tier in zip(f.keys, chunks, tiers):
                if tier is not None:
                    f.hits[tier] = f.hits.get(tier, 0) + 1
                elif key in earlier:
                    f.pending.append(key)
                else:
                    f.missing[key] = chunk
                    f.misses += 1
            earlier.update(f.missing)
        self.store.note_misses(sum(f.misses for f in found))  # cache stats agree with the answers' misses
        return found

    def ensure_many(self, lookups: Sequence[Lookup]) -> None:
        """Compute the misses of several prompts' lookups together (packed passes, each chunk once across
        sidecars) and settle each lookup's counts: chunks another sidecar computed, and the `pending`."""
        missing = {k: c for f in lookups for k, c in f.missing.items()}
        shared = self.precompute(missing)
        pending = list(dict.fromkeys(k for f in lookups for k in f.pending))
        tiers = dict(zip(pending, self.store.lookup(pending))) if pending else {}
        for f in lookups:
            f.count_shared(shared)
            f.count_pending(tiers)

    def precompute(self, missing: dict[ChunkKey, Sequence[int]]) -> dict[ChunkKey, str]:
        """Compute and store the KV of `missing` chunks, each once across sidecars, written behind to
        the disk tier; returns the keys another sidecar computed meanwhile -> their tier."""
        if not missing:
            return {}
        return compute_once(self.store, missing, self.compute, write_behind=True)

    def ensure(self, chunks: Sequence[Sequence[int]], namespace: str) -> Lookup:
        """Look `chunks` up and compute the misses."""
        found = self.lookup(chunks, namespace)
        self.ensure_many([found])
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
                found[i] = self.compute([chunks[i]])[0]
        return recomputed

    def compute_prefix(self, plan: BlendPlan, key: ChunkKey) -> LayeredKV:
        """The prefix's KV from position 0, stored under `key`."""
        kv = ChunkKV(self.model.forward_kv(plan.input_ids[: plan.prefix_len], torch.arange(plan.prefix_len)), pos0=0)
        self.store.put(key, kv)
        return kv
