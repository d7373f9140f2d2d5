"""Which KV each chunk of a prompt loads (its base entry or one of its stored variants), and what
cachecraft decided for it.

A chunk's base entry was computed with no chunk before it; a variant (`storage/variants.py`) after the
chunks it records. `choose_variants` picks, per chunk, the stored variant whose preceding chunks
overlap the chunks now before it most (`overlap`: in order, foreign ones count against it), or the
base entry when no variant overlaps more. cachecraft then budgets the chunk's recompute with
CCI x (1 - overlap of the chosen source) and reports a `ChunkDecision` per chunk in the blend result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..chunk_cache import ChunkKey
from ..storage.variants import variant_key

ACTIONS = ("reuse", "fix", "recompute")  # nothing recomputed / some tokens / every token of the chunk


def overlap(variant_preceding: Sequence[ChunkKey], prompt_preceding: Sequence[ChunkKey]) -> float:
    """How much of the context a chunk's KV was computed in is the context it has now: the chunks before
    it in both, in the same relative order (a reordered chunk counts 0), over the larger of the two
    lists, so chunks missing now and chunks that were not there both count against it. 1 when nothing
    is before it in either (the base entry of a prompt's first chunk)."""
    if not prompt_preceding and not variant_preceding:
        return 1.0
    now = set(prompt_preceding)
    earlier = [k for k in variant_preceding if k in now]
    common = set(earlier)
    kept = [k for k in prompt_preceding if k in common]
    in_order = sum(a == b for a, b in zip(earlier, kept))
    return in_order / max(len(prompt_preceding), len(variant_preceding))


@dataclass(frozen=True)
class SourceChoice:
    """The KV one chunk loads."""

    key: ChunkKey  # the base key, or the chosen variant's key
    preceding: tuple[ChunkKey, ...]  # the chunks before it when that KV was computed (none: the base)
    overlap: float  # overlap(preceding, the chunks before it in this prompt)
    variant: bool = False  # a stored variant (the first chunk's, after the prompt prefix, has no preceding)
    after_prefix: bool = False  # computed after this prompt's prefix (not after the attention sink alone)

    @property
    def is_variant(self) -> bool:
        return self.variant

    @property
    def exact(self) -> bool:
        """A variant computed in this very context (prefix and preceding chunks): the full prefill's rows."""
        return self.is_variant and self.after_prefix and self.overlap >= 1.0


def base_choices(keys: Sequence[ChunkKey]) -> list[SourceChoice]:
    """Every chunk loads its base entry."""
    return [SourceChoice(key, (), overlap((), keys[:i])) for i, key in enumerate(keys)]


class BoundSources:
    """What a strategy that loads KV variants (cachecraft, focus) binds in `choose_sources` (`bind`): its chunks'
    base `keys` (prompt order), the `metadata` store their variants are recorded in, and per chunk the
    `choices` (`SourceChoice`) it loads. A chunk whose chosen variant vanished loads its base entry
    (`source_lost`); after the first token, each variant loaded counts one more reuse (`finish`)."""

    name: str
    keys: list[ChunkKey] | None = None
    metadata = None  # a MetadataStore
    choices: list[SourceChoice] | None = None

    def bind(self, keys: Sequence[ChunkKey], metadata, choices: Sequence[SourceChoice] | None = None) -> None:
        """The keys of the plan's chunks (plan order), where their metadata lives, and the KV each chunk
        loads (None: every chunk its base entry)."""
        self.keys, self.metadata = list(keys), metadata
        self.choices = list(choices) if choices is not None else base_choices(self.keys)
        if len(self.choices) != len(self.keys):
            raise ValueError(f"{self.name} bound to {len(self.keys)} keys and {len(self.choices)} sources")

    def source_lost(self, index: int) -> None:
        self.choices[index] = base_choices(self.keys)[index]

    def finish(self) -> None:
        if self.metadata is not None and self.choices:
            self.metadata.count_reuses([c.key for c in self.choices if c.is_variant])


def held_variants(keys: Sequence[ChunkKey], metadata, store, accept) -> dict[ChunkKey, list]:
    """Per distinct chunk of `keys`: its variants recorded in `metadata` that `accept(record)` admits and
    `store` holds (`lookup`, no I/O)."""
    distinct = list(dict.fromkeys(keys))
    by_base = dict(zip(distinct, metadata.variants_of(distinct)))
    records = [r for rs in by_base.values() for r in rs if accept(r)]
    tiers = store.lookup([r.key for r in records]) if records else []
    held = {r.key for r, tier in zip(records, tiers) if tier}
    return {base: [r for r in rs if r.key in held] for base, rs in by_base.items()}


def choose_variants(keys: Sequence[ChunkKey], metadata, store, prefix: ChunkKey | None = None) -> list[SourceChoice]:
    """Per chunk (`keys` in prompt order): the variant recorded in `metadata` (a MetadataStore) and held
    by `store` (a TieredStore: `lookup`, no I/O) whose preceding chunks overlap the chunks before it now
    most (ties: one computed after the prompt prefix `prefix`, then more reuses), if it overlaps more
    than the base entry does (or as much, exactly: after the very prefix and chunks now before it);
    else the base entry. A variant computed after another prompt prefix is not considered; one computed
    after the attention sink and its preceding chunks alone (a neighbour variant of `chunk_context =
    "sink"`) is, but is never exact."""
    choices = base_choices(keys)
    own = held_variants(
        keys,
        metadata,
        store,
        lambda r: r.key in (variant_key(r.base, r.preceding, prefix), r.base.variant(r.preceding)),
    )
    for i, key in enumerate(keys):
        before = tuple(keys[:i])
        scored = [
            (overlap(r.preceding, before), r.key == variant_key(r.base, r.preceding, prefix), r.reuses, r)
            for r in own[key]
        ]
        if not scored:
            continue
        best, after_prefix, _, record = max(scored, key=lambda s: s[:3])
        if best > choices[i].overlap or (best >= 1.0 and after_prefix):
            choices[i] = SourceChoice(record.key, record.preceding, best, variant=True, after_prefix=after_prefix)
    return choices


def choose_context(
    keys: Sequence[ChunkKey], metadata, store, prefix: ChunkKey | None, first_exact: bool = True
) -> list[SourceChoice]:
    """Per chunk (`keys` in prompt order), for strategies that recompute by their own selection (focus):
    any held variant computed after the prompt prefix `prefix` is closer to this prompt than the base
    entry (which saw no passage), whether or not the chunks it saw are in this prompt (a neighbour
    variant, engine/neighbour_variants.py). The best is the one whose preceding chunks overlap the chunks
    before it now most (`overlap`; 1: an exact variant), then the one with more of its preceding chunks
    anywhere in this prompt, then more reuses. With `first_exact` the first chunk keeps its base entry
    (computed after this very prefix: the full prefill's rows)."""
    choices = base_choices(keys)
    if prefix is None:
        return choices
    after_prefix = held_variants(keys, metadata, store, lambda r: r.key == variant_key(r.base, r.preceding, prefix))
    present = set(keys)
    for i, key in enumerate(keys):
        if i == 0 and first_exact:
            continue
        before = tuple(keys[:i])
        scored = [
            (overlap(r.preceding, before), sum(k in present for k in r.preceding), r.reuses, r)
            for r in after_prefix[key]
        ]
        if scored:
            best, _, _, record = max(scored, key=lambda s: s[:3])
            choices[i] = SourceChoice(record.key, record.preceding, best, variant=True, after_prefix=True)
    return choices


@dataclass(frozen=True)
class ChunkDecision:
    """What cachecraft did with one chunk of the prompt."""

    source: str  # "base", or the variant's key ("namespace/digest")
    overlap: float  # of the loaded KV's context with the prompt's
    action: str  # one of ACTIONS
    recomputed: int  # chunk tokens recomputed from layer 0
    reason: str = ""  # "exact variant", "unfocused" (early stop), "" otherwise

    @property
    def used_variant(self) -> bool:
        return self.source != "base"
