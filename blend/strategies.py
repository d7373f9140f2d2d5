"""Fusion strategies behind one interface: which tokens are computed from layer 0, which cached KV
is reused, and how the computed set is narrowed at check layers.

`full` reuses nothing (the baseline); `prefix` reuses only an exact prompt prefix (what vLLM/SGLang
do); `naive` reuses every chunk and computes only fresh tokens; `cacheblend` recomputes the tokens
whose KV deviates most; `epic` recomputes the first tokens of every chunk; `cachecraft`
(blend/cachecraft.py) budgets each chunk from what was recorded when it was last seen in context.
`cacheblend+query` picks its tokens before layer 0 by the question's attention (blend/query_select.py).
`make_strategy` (blend/registry.py) makes one by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .config import SELECTIVE, BlendConfig, strategy_label, validate
from .plan import BlendPlan
from .query_select import query_aware_tokens, question_attention
from .select import budget, keep_top


class Strategy(ABC):
    """How one plan is fused."""

    name: str
    reuse: str = "chunks"  # which cached KV the engine loads: "none", "prefix" or "chunks"
    scouted: torch.Tensor | None = None  # [N] the question's attention, scouted with other requests' (a batch)

    def __init__(self, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> None:
        validate(self.name, ratio)
        self.ratio = float(ratio)
        self.config = config

    def prepare(self, model, plan: BlendPlan, sources) -> None:
        """Called by the blend loop before `initial_tokens`, with the model and the cached `sources`
        (target start row, LayeredKV): strategies that choose tokens before layer 0 do it here."""

    def wants_scout(self, plan: BlendPlan, sources) -> bool:
        """Whether `prepare` ranks this prompt's tokens by the question's attention (a scout pass), so
        that a batch may scout it together with other requests' and set `scouted` first."""
        return False

    def question_attention(self, model, plan: BlendPlan, sources) -> torch.Tensor:
        """[N] the question's attention to each row (blend/query_select.py): `scouted` when a batch set
        it, else this prompt's own scout pass over `config.scout_layers`."""
        if self.scouted is not None:
            return self.scouted
        return question_attention(model, plan, sources, self.config.scout_layers)

    def choose_sources(self, keys: list, store, prefix=None, first_exact: bool = False) -> list:
        """The store entry each chunk loads (`keys`: the chunks' base keys in plan order; `prefix`: the
        key of the prompt's prefix; `first_exact`: the first chunk's base entry is the full prefill's
        rows): the base entry by default; a strategy that uses KV variants (cachecraft, focus) may pick
        an entry computed in a context closer to this prompt's. Called by the Engine after lookup,
        before the entries are read."""
        return list(keys)

    def source_lost(self, index: int) -> None:
        """The entry chosen for chunk `index` vanished since `choose_sources`: it loads its base entry."""

    def finish(self) -> None:
        """Upkeep after the first token is out (cachecraft: the variants loaded were reused once more)."""

    @abstractmethod
    def initial_tokens(self, plan: BlendPlan, cached: torch.Tensor) -> torch.Tensor:
        """[N] bool of tokens computed from layer 0 on; `cached` [N] marks rows loaded from cache."""

    def check_layers(self) -> tuple[int, ...]:
        """Layers at which `narrow` is called (none by default)."""
        return ()

    def narrow(
        self,
        step: int,
        plan: BlendPlan,
        rows: torch.Tensor,
        is_cached: torch.Tensor,
        deviation: torch.Tensor,
        num_cached: int,
    ) -> torch.Tensor:
        """At the `step`-th check layer, given the active rows [S] (sorted), which of them are cached,
        and their K/V deviation: [S] bool of the active tokens to keep computing."""
        return torch.ones_like(is_cached)

    def decisions(self) -> list:
        """Per chunk, what the strategy decided (cachecraft's `ChunkDecision`s); empty for the others."""
        return []

    @property
    def label(self) -> str:
        """`cacheblend@0.15`, `cacheblend+query@0.15`, `full` (blend/config.py `strategy_label`)."""
        query = self.name in SELECTIVE and self.config.select == "query"
        return strategy_label(self.name + ("+query" if query else ""), self.ratio)


class Full(Strategy):
    name, reuse = "full", "none"

    def initial_tokens(self, plan, cached):
        return torch.ones(plan.num_tokens, dtype=torch.bool)


class Prefix(Strategy):
    name, reuse = "prefix", "prefix"

    def initial_tokens(self, plan, cached):
        return ~cached


class Naive(Strategy):
    name = "naive"

    def initial_tokens(self, plan, cached):
        return ~cached


class CacheBlend(Strategy):
    """Layers before the first check layer run in full; each check layer keeps the most deviating
    tokens, a larger set first (gradual filtering), `ratio` of the chunk tokens at the last.
    With `config.select == "query"` the tokens are instead those the question attends to most in a
    scout pass, chosen before layer 0 (no full layers, no check layer)."""

    name = "cacheblend"

    def __init__(self, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> None:
        super().__init__(ratio, config)
        self._chosen: torch.Tensor | None = None  # [N] rows chosen before layer 0 (select="query")

    def wants_scout(self, plan, sources):
        return self.config.select == "query" and self.ratio > 0.0 and plan.has_candidates(sources)

    def prepare(self, model, plan, sources):
        if self.config.select == "query" and self.ratio > 0.0:
            self._chosen = query_aware_tokens(model, plan, sources, self.ratio, self.config.scout_layers, self.scouted)

    def initial_tokens(self, plan, cached):
        if self.ratio == 0.0:  # nothing to recompute: exactly naive, no full layers
            return ~cached
        if self.config.select == "query":
            if self._chosen is None:
                raise RuntimeError("cacheblend+query chooses its tokens in prepare(), before initial_tokens")
            return ~cached | self._chosen
        return torch.ones(plan.num_tokens, dtype=torch.bool)

    def check_layers(self):
        return self.config.check_layers if self.ratio > 0.0 and self.config.select == "check" else ()

    def fraction(self, step: int) -> float:
        later = len(self.check_layers()) - 1 - step
        return min(1.0, self.ratio * self.config.gradual_factor**later)

    def narrow(self, step, plan, rows, is_cached, deviation, num_cached):
        return keep_top(is_cached, deviation, budget(self.fraction(step), num_cached))


class Epic(Strategy):
    """EPIC's position-independent caching: recompute the first ceil(ratio * len) tokens of each chunk."""

    name = "epic"

    def initial_tokens(self, plan, cached):
        active = ~cached
        for i, (start, end) in enumerate(plan.chunk_spans):
            if i not in plan.exact_chunks:
                active[start : start + math.ceil(self.ratio * (end - start) - 1e-9)] = True
        return active
