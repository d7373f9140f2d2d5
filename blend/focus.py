"""`focus`: recompute the chunk tokens the answer turns on, as many as the question needs.

A scout pass before layer 0 (blend/scout.py) measures the question's attention to every chunk token
at deep layers (blend/query_select.py). Tokens are ranked by that attention; optionally fused with
CacheBlend's KV deviation at a check layer (dual stage, as ProphetKV: the check layer keeps the top of
`(1 - w) * attention share + w * deviation share`), widened to their neighbours, and topped up with
each chunk's last tokens (the tokens just before a separator, which the next chunk and the question see
first). The budget is the request's ratio, or with `focus_mass > 0` adaptive: the fewest tokens whose
question-attention mass reaches `focus_mass`, between `focus_floor` and the request's ratio (the cap).
The ratio used is reported as the blend's `recompute_fraction` (every chosen token is computed in every
layer when there is no check layer). Rows of the plan's `exact_chunks` are never candidates: the budget
(a share of all cached rows) goes to the chunks whose KV did not see this prompt.

Each chunk loads the KV closest to this prompt that the store holds (`choose_context`): a variant
computed after this prompt's prefix and other passages (its neighbours by embedding, stored at
ingestion: engine/neighbour_variants.py; or chunks it followed in an earlier prompt) over its base
entry, which saw no passage.
"""

from __future__ import annotations

import math

import torch

from ..storage.metadata import metadata_store
from .config import BlendConfig
from .query_select import top_rows
from .select import budget, keep_top
from .strategies import Strategy
from .variant_choice import BoundSources, ChunkDecision, choose_context


def mass_budget(score: torch.Tensor, candidates: torch.Tensor, mass: float, floor: int, cap: int) -> int:
    """How many `candidates` [N] bool rows, taken by decreasing `score` [N], it takes for their share of
    the candidates' total score to reach `mass`; clamped to [floor, cap]."""
    values = score[candidates].float().clamp_min(0.0).sort(descending=True).values
    total = float(values.sum())
    if values.numel() == 0:
        return 0
    if total <= 0.0:
        need = floor
    else:
        cumulative = values.cumsum(0) / total
        need = int(torch.searchsorted(cumulative, torch.tensor([mass - 1e-9])).item()) + 1
    return max(floor, min(cap, need, values.numel()))


def widen(chosen: torch.Tensor, candidates: torch.Tensor, radius: int) -> torch.Tensor:
    """[N] bool: `chosen` plus the `candidates` within `radius` rows of a chosen row."""
    if radius <= 0 or not bool(chosen.any()):
        return chosen
    kernel = torch.ones(1, 1, 2 * radius + 1)
    spread = torch.nn.functional.conv1d(chosen.float()[None, None], kernel, padding=radius)[0, 0] > 0
    return chosen | (spread & candidates)


def chunk_tails(spans, num_tokens: int, tail: int) -> torch.Tensor:
    """[N] bool: the last `tail` tokens of every chunk span [start, end)."""
    out = torch.zeros(num_tokens, dtype=torch.bool)
    if tail > 0:
        for start, end in spans:
            out[max(start, end - tail) : end] = True
    return out


class Focus(BoundSources, Strategy):
    """Query-driven selective recompute with an optional adaptive budget (module doc)."""

    name = "focus"

    def __init__(self, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> None:
        super().__init__(ratio, config)
        self._chosen: torch.Tensor | None = None  # [N] rows recomputed from layer 0 (no check layer)
        self._attention: torch.Tensor | None = None  # [N] question attention share (dual stage)
        self._count = 0  # chunk tokens the budget allows (dual stage: kept at the check layer)
        self._spans = None  # the plan's chunk spans, for `decisions`

    def choose_sources(self, keys, store, prefix=None, first_exact=False):
        """Per chunk, its held variant closest to this prompt (`choose_context`), else its base entry."""
        meta = metadata_store(store)
        self.bind(keys, meta, choose_context(keys, meta, store, prefix, first_exact))
        return [c.key for c in self.choices]

    @property
    def dual(self) -> bool:
        return self.config.focus_deviation > 0.0

    def wants_scout(self, plan, sources):
        return self.ratio > 0.0 and plan.has_candidates(sources)  # else prepare ranks nothing

    def decisions(self):
        """Per chunk when `choose_sources` bound it: the KV it loaded (base or a variant, `ChunkDecision`);
        `recomputed` counts the tokens chosen before layer 0 (dual stage: its last tokens only)."""
        if not self.choices or self._chosen is None or len(self._spans) != len(self.choices):
            return []
        out = []
        for c, (start, end) in zip(self.choices, self._spans):
            n = int(self._chosen[start:end].sum())  # set by prepare, with the spans
            out.append(ChunkDecision(str(c.key) if c.is_variant else "base", c.overlap, "fix" if n else "reuse", n))
        return out

    def prepare(self, model, plan, sources):
        self._spans = plan.chunk_spans
        cached = plan.source_mask(sources)
        num_cached = int((cached & plan.chunk_mask()).sum())  # chunk rows loaded (a cached prefix is not)
        candidates = plan.candidates(cached)  # [N] rows whose cached KV may deviate
        self._chosen = torch.zeros(plan.num_tokens, dtype=torch.bool)
        if self.ratio <= 0.0 or not bool(candidates.any()):
            self._count = 0
            return
        score = self.question_attention(model, plan, sources)  # [N], 0 off chunks (scouted in a batch or here)
        cap = budget(self.ratio, num_cached)
        if self.config.focus_mass > 0.0:
            floor = min(cap, budget(self.config.focus_floor, num_cached))
            count = mass_budget(score, candidates, self.config.focus_mass, floor, cap)
        else:
            count = min(cap, int(candidates.sum()))
        tails = chunk_tails(plan.chunk_spans, plan.num_tokens, self.config.focus_tail) & candidates
        count = max(0, count - int(tails.sum()))
        if self.dual:
            self._attention, self._count = score, count
            self._chosen = tails
            return
        chosen = top_rows(score, candidates & ~tails, self._pre_widen(count)) | tails
        self._chosen = widen(chosen, candidates, self.config.focus_radius)

    def _pre_widen(self, count: int) -> int:
        """Tokens to pick before widening, so that about `count` remain after it."""
        return math.ceil(count / (1 + 2 * self.config.focus_radius)) if self.config.focus_radius else count

    def initial_tokens(self, plan, cached):
        if self._chosen is None:
            raise RuntimeError("focus chooses its tokens in prepare(), before initial_tokens")
        if self.dual and self._count > 0:
            return torch.ones(plan.num_tokens, dtype=torch.bool)  # layers before the check layer in full
        return ~cached | self._chosen

    def check_layers(self):
        return self.config.check_layers[-1:] if self.dual and self._count > 0 else ()

    def narrow(self, step, plan, rows, is_cached, deviation, num_cached):
        attention = self._attention.to(rows.device)[rows]  # [S]
        dev = deviation.float().masked_fill(~is_cached, 0.0)
        w = self.config.focus_deviation
        fused = (1 - w) * attention / attention.sum().clamp_min(1e-12) + w * dev / dev.sum().clamp_min(1e-12)
        keep = keep_top(is_cached, fused, self._count)
        return keep | self._chosen.to(rows.device)[rows]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.ratio:g}"
