"""Strategy `cachecraft` (after Cache-Craft, SIGMOD'25): per-chunk budgets from recorded chunk metadata,
every token chosen before layer 0 (no check layer, no full layers).

For each chunk of the prompt, the metadata recorded when it was last seen in context
(`storage/metadata.py`, written by `blend/chunk_metadata.py`) gives its CCI and the ranking of its
tokens by attention to the chunks before it. The Engine picks the KV each chunk loads
(`blend/variant_choice.py`): its base entry (computed with no chunk before it: overlap 1 for the first
chunk, 0 otherwise) or the stored variant whose preceding chunks overlap the prompt's most. The chunk's
weight is CCI * (1 - overlap). Per chunk, one decision (`ChunkDecision`, in the blend result):
- an exact variant (computed after exactly the chunks now before it, in order) is reused as is: 0 tokens;
- `config.craft_alpha > 0`: chunk fraction = min(1, alpha * weight) (Cache-Craft's rule);
- `craft_alpha == 0` (default): `ratio` of the chunk tokens, a variant's tokens counted x (1 - overlap)
  (so a partial variant shrinks the budget), split with each chunk first getting `craft_min_share` of
  its even share, the rest in proportion to weight x length (capped at the whole chunk); with base
  entries only, cachecraft@r recomputes as many tokens as cacheblend@r would after its check layer;
- early stop (`craft_focus > 0`): a chunk whose share of the question's attention (scout pass) is
  below `craft_focus` recomputes nothing.
Its action is "reuse" (0 tokens), "fix" (some) or "recompute" (all). A chunk keeps the first tokens of
its ranking; with `select="query"` (`cachecraft+query`) the tokens the question attends to most instead.
Chunks with no metadata (seen for the first time) fall back to the query-aware choice
(`blend/query_select.py`) at the same budget rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..storage.metadata import ChunkMetadata, metadata_store
from .config import BlendConfig
from .query_select import top_rows
from .strategies import Strategy
from .variant_choice import BoundSources, ChunkDecision, choose_variants, overlap

__all__ = ["CacheCraft", "allocate", "overlap"]


def allocate(weights: Sequence[float], lengths: Sequence[int], total: int, min_share: float) -> list[int]:
    """Tokens per chunk summing to `total` (<= sum of lengths): a floor of `min_share` of the even share,
    the rest in proportion to weight x length, no chunk above its length."""
    n_all = sum(lengths)
    total = min(total, n_all)
    counts = [min(length, math.floor(min_share * total * length / n_all)) for length in lengths] if n_all else []
    left = total - sum(counts)
    while left > 0:
        open_ = [i for i, length in enumerate(lengths) if counts[i] < length]
        mass = sum(weights[i] * lengths[i] for i in open_)
        share = {
            i: (weights[i] * lengths[i] / mass if mass > 0 else lengths[i] / sum(lengths[j] for j in open_))
            for i in open_
        }
        given = 0
        for i in open_:
            add = min(lengths[i] - counts[i], math.floor(left * share[i]))
            counts[i] += add
            given += add
        if given == 0:  # rounding: hand out single tokens by share
            for i in sorted(open_, key=lambda j: -share[j]):
                if given == left:
                    break
                counts[i] += 1
                given += 1
        left -= given
    return counts


class CacheCraft(BoundSources, Strategy):
    """Per-chunk reuse-and-fix from recorded metadata and stored KV variants; tokens known before layer 0."""

    name = "cachecraft"

    def __init__(self, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> None:
        super().__init__(ratio, config)
        self._chosen: torch.Tensor | None = None
        self.fractions: list[float] = []  # per chunk, set by prepare: recomputed share of its tokens
        self._decisions: list[ChunkDecision] = []
        self._surveyed: tuple | None = None  # (plan, metas, reasons) from wants_scout, for prepare

    def choose_sources(self, keys, store, prefix=None, first_exact=False):
        """Binds the chunks' keys and the store's metadata; with `craft_variants > 0` each chunk loads
        the held variant (computed after this prompt's `prefix`, or a neighbour variant) whose preceding
        chunks overlap this prompt's most (else its base entry)."""
        meta = metadata_store(store)
        choices = choose_variants(keys, meta, store, prefix) if self.config.craft_variants else None
        self.bind(keys, meta, choices)
        return [c.key for c in self.choices]

    def decisions(self) -> list[ChunkDecision]:
        return list(self._decisions)

    def _survey(self, plan) -> tuple[list[ChunkMetadata | None], list[str]]:
        """Per chunk: its recorded metadata (None: never seen at this length) and why it recomputes
        nothing whatever its weight ("exact", "exact variant"; "" for the chunks the budget splits over)."""
        spans = plan.chunk_spans
        metas: list[ChunkMetadata | None] = [None] * len(spans)
        choices = self.choices or [None] * len(spans)
        if self.keys is not None and self.metadata is not None:
            if len(self.keys) != len(spans):
                raise ValueError(f"cachecraft bound to {len(self.keys)} keys for {len(spans)} chunks")
            metas = self.metadata.get_many(self.keys)
        metas = [m if m is not None and m.num_tokens == end - start else None for m, (start, end) in zip(metas, spans)]
        reasons = [
            "exact variant" if c is not None and c.exact else "exact" if i in plan.exact_chunks else ""
            for i, c in enumerate(choices)
        ]
        return metas, reasons

    def _needs_attention(self, metas, reasons) -> bool:
        """Whether the question's attention decides anything: the early stop, `select="query"`, or a
        chunk with no metadata, among the chunks the budget splits over."""
        live = [i for i, reason in enumerate(reasons) if not reason]
        query_led = self.config.craft_focus > 0.0 or self.config.select == "query"
        return self.ratio > 0 and bool(live) and (query_led or any(metas[i] is None for i in live))

    def wants_scout(self, plan, sources):
        self._surveyed = (plan, *self._survey(plan))  # prepare reads it back (one metadata read)
        return self._needs_attention(*self._surveyed[1:])

    def prepare(self, model, plan, sources):
        spans = plan.chunk_spans
        choices = self.choices or [None] * len(spans)
        surveyed, self._surveyed = self._surveyed, None
        metas, reasons = surveyed[1:] if surveyed is not None and surveyed[0] is plan else self._survey(plan)
        lengths = [end - start for start, end in spans]
        ov = [c.overlap if c is not None else (1.0 if i == 0 else 0.0) for i, c in enumerate(choices)]
        scale = [1.0 - o if c is not None and c.is_variant else 1.0 for c, o in zip(choices, ov)]
        focus = self.config.craft_focus > 0.0
        # over the blend's own buffers when the prompt scouted first (or with a batch), else a pass here
        attention = self.question_attention(model, plan, sources) if self._needs_attention(metas, reasons) else None
        if focus and attention is not None:  # early stop: chunks the question barely looks at are reused
            for i, (start, end) in enumerate(spans):
                if not reasons[i] and float(attention[start:end].sum()) < self.config.craft_focus:
                    reasons[i] = "unfocused"
        live = [i for i in range(len(spans)) if not reasons[i]]
        known = [i for i in live if metas[i] is not None]
        unknown = [i for i in live if metas[i] is None]
        chosen = torch.zeros(plan.num_tokens, dtype=torch.bool)
        counts = [0] * len(spans)
        if known:
            weights = [metas[i].cci * (1.0 - ov[i]) for i in known]
            if self.config.craft_alpha > 0.0:
                part = [
                    min(lengths[i], math.ceil(min(1.0, self.config.craft_alpha * w) * lengths[i] - 1e-9))
                    for i, w in zip(known, weights)
                ]
            else:
                total = math.ceil(self.ratio * sum(lengths[i] * scale[i] for i in known) - 1e-9)
                part = allocate(weights, [lengths[i] for i in known], total, self.config.craft_min_share)
            for i, count in zip(known, part):
                counts[i] = count
                start = spans[i][0]
                if count == 0:
                    continue
                if attention is not None and self.config.select == "query":
                    mask = torch.zeros(plan.num_tokens, dtype=torch.bool)
                    mask[start : spans[i][1]] = True
                    chosen |= top_rows(attention, mask, count)
                else:
                    chosen[start + torch.as_tensor(metas[i].ranking[:count], dtype=torch.long)] = True
        if unknown and attention is not None:
            mask = torch.zeros(plan.num_tokens, dtype=torch.bool)
            for i in unknown:
                mask[spans[i][0] : spans[i][1]] = True
            total = math.ceil(self.ratio * sum(lengths[i] * scale[i] for i in unknown) - 1e-9)
            picked = top_rows(attention, mask, total)
            chosen |= picked
            for i in unknown:
                counts[i] = int(picked[spans[i][0] : spans[i][1]].sum())
        self.fractions = [c / n for c, n in zip(counts, lengths)]
        self._decisions = [
            ChunkDecision(
                str(c.key) if c is not None and c.is_variant else "base",
                ov[i],
                "reuse" if counts[i] == 0 else "recompute" if counts[i] == lengths[i] else "fix",
                counts[i],
                reasons[i],
            )
            for i, c in enumerate(choices)
        ]
        self._chosen = chosen

    def initial_tokens(self, plan, cached):
        if self._chosen is None:
            raise RuntimeError("cachecraft chooses its tokens in prepare(), before initial_tokens")
        return ~cached | (self._chosen & cached)
