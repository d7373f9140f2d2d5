"""Strategy `cachecraft` (after Cache-Craft, SIGMOD'25): per-chunk budgets from recorded chunk metadata,
every token chosen before layer 0 (no check layer, no full layers).

For each chunk of the prompt, the metadata recorded when it was last seen in context
(`storage/metadata.py`, written by `blend/chunk_metadata.py`) gives its CCI and the ranking of its
tokens by attention to the chunks before it. The stored KV was computed with no chunk before it, so its
context overlap with the new prompt is 1 for the first chunk (nothing before it now either) and 0
otherwise; the chunk's weight is CCI * (1 - overlap). Budgets:
- `config.craft_alpha > 0`: chunk fraction = min(1, alpha * weight) (Cache-Craft's rule);
- `craft_alpha == 0` (default): `ratio` of all chunk tokens, each chunk first getting
  `craft_min_share` of its even share, the rest split in proportion to weight x length (capped at the
  whole chunk), so cachecraft@r recomputes as many tokens as cacheblend@r would after its check layer.
A chunk keeps the first tokens of its ranking; with `select="query"` (`cachecraft+query`) it keeps the
tokens the question attends to most instead. Chunks with no metadata (seen for the first time) fall
back to the query-aware choice (`blend/query_select.py`) at `ratio` of their tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..chunk_cache import ChunkKey
from ..storage.metadata import ChunkMetadata, MetadataStore
from .config import BlendConfig
from .query_select import question_attention, top_rows
from .strategies import Strategy


def overlap(variant_preceding: Sequence[ChunkKey], prompt_preceding: Sequence[ChunkKey]) -> float:
    """Share of the chunks now before a chunk that were also before it when its KV was computed, in
    the same relative order (1 when nothing is before it now)."""
    if not prompt_preceding:
        return 1.0
    earlier = [k for k in variant_preceding if k in set(prompt_preceding)]
    kept = [k for k in prompt_preceding if k in set(earlier)]
    in_order = sum(a == b for a, b in zip(earlier, kept))  # order penalised: a reordered chunk counts 0
    return in_order / len(prompt_preceding)


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


class CacheCraft(Strategy):
    """Per-chunk reuse-and-fix from recorded metadata; tokens known before layer 0."""

    name = "cachecraft"

    def __init__(self, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> None:
        super().__init__(ratio, config)
        self.keys: list[ChunkKey] | None = None
        self.metadata: MetadataStore | None = None
        self._chosen: torch.Tensor | None = None
        self.fractions: list[float] = []  # per chunk, set by prepare: recomputed share of its tokens

    @property
    def label(self) -> str:
        suffix = "+query" if self.config.select == "query" else ""
        return f"{self.name}{suffix}@{self.ratio:g}"

    def bind(self, keys: Sequence[ChunkKey], metadata: MetadataStore) -> None:
        """The keys of the plan's chunks (plan order) and where their metadata lives."""
        self.keys, self.metadata = list(keys), metadata

    def prepare(self, model, plan, sources):
        spans = plan.chunk_spans
        metas: list[ChunkMetadata | None] = [None] * len(spans)
        if self.keys is not None and self.metadata is not None:
            if len(self.keys) != len(spans):
                raise ValueError(f"cachecraft bound to {len(self.keys)} keys for {len(spans)} chunks")
            metas = self.metadata.get_many(self.keys)
        lengths = [end - start for start, end in spans]
        metas = [m if m is not None and m.num_tokens == n else None for m, n in zip(metas, lengths)]
        chosen = torch.zeros(plan.num_tokens, dtype=torch.bool)
        known = [i for i, m in enumerate(metas) if m is not None]
        unknown = [i for i, m in enumerate(metas) if m is None]
        attention = None
        if unknown or (known and self.config.select == "query"):
            attention = question_attention(model, plan, sources, self.config.scout_layers) if self.ratio > 0 else None
        counts = [0] * len(spans)
        if known:
            # the stored KV was computed with no chunk before it: overlap with what precedes it now
            weights = [metas[i].cci * (1.0 - overlap((), self.keys[:i])) for i in known]
            if self.config.craft_alpha > 0.0:
                part = [
                    min(lengths[i], math.ceil(min(1.0, self.config.craft_alpha * w) * lengths[i] - 1e-9))
                    for i, w in zip(known, weights)
                ]
            else:
                total = math.ceil(self.ratio * sum(lengths[i] for i in known) - 1e-9)
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
            picked = top_rows(attention, mask, math.ceil(self.ratio * int(mask.sum()) - 1e-9))
            chosen |= picked
            for i in unknown:
                counts[i] = int(picked[spans[i][0] : spans[i][1]].sum())
        self.fractions = [c / n for c, n in zip(counts, lengths)]
        self._chosen = chosen

    def initial_tokens(self, plan, cached):
        if self._chosen is None:
            raise RuntimeError("cachecraft chooses its tokens in prepare(), before initial_tokens")
        return ~cached | (self._chosen & cached)
