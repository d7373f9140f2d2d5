"""Chunk KV variants: a chunk's KV as computed in context, after given preceding chunks.

A variant is an ordinary entry of the TieredStore under its own key, `base.variant(preceding)` (tiers,
codecs, checksums and namespaces apply as to any entry); its KV holds the chunk's rows from a prefill of
the whole context, keys rotated at their positions there (`pos0` = the chunk's first row), so the blend
re-rotates it like a base entry. The metadata store (`storage/metadata.py`) records which variants of a
chunk exist: a `VariantRecord` per variant with its preceding keys, reuse count, bytes and compute saved.

A variant's rows are exact for a prompt whose prefix (chat template + instruction: everything before
the first chunk) is the one it was computed after, so with a `prefix` key (the prompt prefix's own
key) the variant key is `variant_key(base, preceding, prefix)` = `base.variant((prefix, *preceding))`:
the same chunks after another template are another variant, and a prompt's first chunk has one too
(its base entry saw the attention sink alone). `choose_variants` accepts a record only when its key is
the one the prompt's prefix gives.

A chunk keeps at most `limit` variants. Beyond that the one of least utility goes,

    utility = reuses x compute_saved / bytes

(`variant_utility`): compute_saved is what computing the variant's KV again costs, in tokens (the
preceding chunks' and its own: the prefill that produced it), so long contexts that recur are kept
over short ones and a variant never reused is the first to go. The variant just stored is never the
victim (it has had no chance to be reused yet); ties go to the oldest, then the key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..chunk_cache import ChunkKey, ChunkKV


@dataclass(frozen=True)
class VariantRecord:
    """One stored variant of the chunk `base`."""

    key: ChunkKey  # the variant's own store key: base.variant(preceding)
    base: ChunkKey
    preceding: tuple[ChunkKey, ...]  # the chunks before it when its KV was computed, in prompt order
    nbytes: int  # bytes of its KV as computed (uncompressed)
    compute_saved: float  # tokens of the prefill that computed it (preceding chunks + its own)
    reuses: int = 0  # prompts that loaded it
    created: float = 0.0  # wall-clock seconds when stored

    @property
    def utility(self) -> float:
        return variant_utility(self.reuses, self.compute_saved, self.nbytes)


def variant_utility(reuses: int, compute_saved: float, nbytes: int) -> float:
    """How much keeping a variant is worth per byte: reuses x compute saved / bytes."""
    return reuses * compute_saved / max(nbytes, 1)


def variants_to_evict(
    records: Sequence[VariantRecord], limit: int, keep: ChunkKey | None = None
) -> list[VariantRecord]:
    """The records to drop so that at most `limit` remain: least utility first (ties: oldest, then key),
    never `keep` (the variant just stored)."""
    excess = len(records) - max(limit, 0)
    if excess <= 0:
        return []
    candidates = sorted((r for r in records if r.key != keep), key=lambda r: (r.utility, r.created, str(r.key)))
    return candidates[:excess]


def variant_key(base: ChunkKey, preceding: Sequence[ChunkKey], prefix: ChunkKey | None = None) -> ChunkKey:
    """The store key of `base`'s KV computed after the prompt prefix `prefix` (None: not part of the key)
    and the chunks `preceding`."""
    return base.variant(((prefix,) if prefix is not None else ()) + tuple(preceding))


def store_variant(
    store,
    metadata,
    base: ChunkKey,
    preceding: Sequence[ChunkKey],
    kv: ChunkKV,
    limit: int,
    compute_saved: float,
    prefix: ChunkKey | None = None,
) -> ChunkKey:
    """Put the in-context KV of chunk `base` (computed after the prompt prefix `prefix` and `preceding`,
    by a prefill of `compute_saved` tokens) into the TieredStore `store` as a variant, record it in
    `metadata` (keeping the reuse count of an earlier copy), and evict the chunk's variants beyond
    `limit` by utility (from the store and the records). Records whose KV the store has evicted
    meanwhile are dropped first. Returns its key."""
    if not preceding and prefix is None:
        raise ValueError("a variant needs preceding chunks or a prefix: with neither, the KV is the base entry")
    if limit < 1:
        raise ValueError(f"a chunk keeps at least one variant when variants are stored, got limit {limit}")
    key = variant_key(base, preceding, prefix)
    store.put(key, kv, cost=float(compute_saved), write_behind=True)
    records = metadata.variants_of([base])[0]
    earlier = next((r for r in records if r.key == key), None)
    reuses = earlier.reuses if earlier else 0
    metadata.put_variant(
        VariantRecord(key, base, tuple(preceding), kv.nbytes, float(compute_saved), reuses, time.time())
    )
    records = metadata.variants_of([base])[0]
    gone = [r for r in records if r.key != key and store.lookup([r.key])[0] is None]
    live = [r for r in records if r not in gone]
    victims = variants_to_evict(live, limit, keep=key)
    for r in victims:
        store.remove(r.key)
    metadata.drop_variants([r.key for r in gone + victims])
    return key


def forget_chunks(store, metadata, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
    """A chunk of `keys` is gone (its document removed or replaced): drop every variant it is part of,
    its own and those computed after it (their KV holds its content), from the TieredStore `store` and
    the records, and the chunks' metadata. Returns the variant keys dropped."""
    records = metadata.variants_involving(keys)
    for r in records:
        store.remove(r.key)
    metadata.drop_variants([r.key for r in records])
    metadata.delete(keys)
    return [r.key for r in records]
