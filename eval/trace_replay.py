"""Trace replay: every request of a trace, in arrival order, against a simulated tiered store, per
strategy: what is read from which tier, what is recomputed, and a TTFT from measured per-token costs.

Strategies (what each caches and reuses):
- `prefix`: vLLM / SGLang prefix caching, modelled at segment granularity (one block per trace id: each
  system-prompt part, passage, history turn, user input) instead of 16-token blocks. A block's key is
  the ids of every segment up to it (a hash chain), so the reuse is the longest run of leading blocks
  still cached; the rest is recomputed and stored. Reuse is exact (nothing of the prefix is recomputed).
  Segment granularity over-counts vLLM's reuse by under one block (< 16 tokens) per request.
- `cacheblend@r`, `epic@r`, `cachecraft`: the system prompt is reused as a prefix (same blocks as
  above); each passage is a position-independent chunk entry; history and user input are recomputed.
  A chunk hit recomputes `ceil(r x hit chunk tokens)` (cacheblend: over the request's hit chunks, as its
  check layer does; epic: per chunk); cacheblend also runs its full layers before the check layer over
  all hit chunk tokens (`TraceCosts.full_layer_share` of a prefill: in the TTFT, not in the token
  counts). A missed chunk is computed whole and stored.
- `cachecraft`: a chunk's entries are variants keyed (chunk id, ids of the passages before it), at most
  `max_variants` per chunk (the least recently used variant of the chunk yields to a new one). A hit
  uses the held variant with the best `overlap` (blend/cachecraft.py) with the passages now before the
  chunk and recomputes `ceil(min(1, alpha x CCI x (1 - overlap)) x length)` tokens (Cache-Craft's budget
  rule; overlap is 1 for the first passage). A hit with overlap < 1 stores this context as a new
  variant. CCI is a constant per chunk (`cci`, default 1.0: chunk CCIs normalised to mean 1, so
  `alpha` is the share a mean chunk with no overlap recomputes; alpha 0.15 = cacheblend@0.15's share).

TTFT (simulated, per request) = recomputed prompt tokens x prefill ms/token + cached tokens read from
each tier x that tier's load ms/token (+ cacheblend's full layers). Linear in tokens by construction.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..blend.cachecraft import overlap
from ..blend.config import parse_strategy, strategy_label
from .sim_store import SimStore
from .trace import TraceRequest

TIERS = ("gpu", "cpu", "disk")
DEFAULT_SPLIT = {"gpu": 0.1, "cpu": 0.3, "disk": 0.6}
SIM_STRATEGIES = ("prefix", "cacheblend", "epic", "cachecraft")


@dataclass(frozen=True)
class SimStrategy:
    """A replayed strategy: `prefix`, `cacheblend@r`, `epic@r` or `cachecraft`."""

    name: str
    ratio: float | None = None  # cacheblend and epic only

    @property
    def label(self) -> str:
        return strategy_label(self.name, self.ratio)


def parse_sim_strategies(text: str) -> list[SimStrategy]:
    """`"prefix,cacheblend@0.15,epic@0.15,cachecraft"` -> strategies (blend/config.py `parse_strategy`);
    cacheblend and epic need a ratio, cachecraft takes none (its budget is craft_alpha x CCI)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name = item.partition("@")[0]
        if name not in SIM_STRATEGIES:
            raise ValueError(f"unknown trace strategy {item!r}; accepted: {', '.join(SIM_STRATEGIES)}")
        name, ratio = parse_strategy(item)
        if name in ("cacheblend", "epic") and ratio is None:
            raise ValueError(f"{name} needs a recompute ratio, e.g. {name}@0.15")
        if name in ("prefix", "cachecraft") and ratio is not None:
            raise ValueError(f"trace strategy {item!r}: {name} takes no recompute ratio")
        out.append(SimStrategy(name, ratio))
    return out


@dataclass(frozen=True)
class TraceCosts:
    """Per-token costs of the simulated TTFT (milliseconds)."""

    prefill_ms_per_token: float
    load_ms_per_token: dict[str, float]  # per tier name
    full_layer_share: float = 0.0  # share of a prefill that cacheblend's layers before its check layer take
    source: str = "given"

    def to_dict(self) -> dict:
        return {
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "load_ms_per_token": dict(self.load_ms_per_token),
            "full_layer_share": self.full_layer_share,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "given") -> TraceCosts:
        loads = {t: float(d["load_ms_per_token"][t]) for t in d["load_ms_per_token"]}
        return cls(float(d["prefill_ms_per_token"]), loads, float(d.get("full_layer_share", 0.0)), source)


@dataclass(frozen=True)
class ReplayConfig:
    """The simulated store and cachecraft's budget rule."""

    capacity: int  # tokens of KV, split over the tiers
    policy: str = "lru"
    split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT))
    craft_alpha: float = 0.15
    cci: float = 1.0
    max_variants: int = 2

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.max_variants < 1 or self.craft_alpha < 0 or self.cci < 0 or not self.split:
            raise ValueError(
                f"replay needs capacity > 0, max_variants >= 1, craft_alpha and cci >= 0 and a tier split; got {self}"
            )

    def capacities(self) -> list[tuple[str, int]]:
        """Token capacity per tier (rounded down; the last tier takes the remainder)."""
        names = list(self.split)
        out = [(t, int(self.capacity * self.split[t])) for t in names[:-1]]
        return out + [(names[-1], self.capacity - sum(c for _, c in out))]


@dataclass
class RequestOutcome:
    """What one request read and recomputed under one strategy."""

    prompt_tokens: int
    chunk_tokens: int
    recomputed_prompt: int
    recomputed_chunk: int  # chunk tokens computed: whole missed chunks + tokens fixed in hit chunks
    tier_tokens: dict[str, int]  # cached tokens read from each tier
    fixed_chunk: int = 0  # tokens recomputed inside hit chunks
    blend_tokens: int = 0  # hit chunk tokens not recomputed (cacheblend's full layers run over them)
    chunk_refs: int = 0
    chunk_hits: int = 0
    overlaps: list[float] = field(default_factory=list)  # cachecraft: best overlap of each chunk hit
    held_variants: list[int] = field(default_factory=list)  # cachecraft: variants held at each chunk hit
    chunk_overlaps: list[float | None] = field(default_factory=list)  # cachecraft: per passage (None: miss)

    def ttft_ms(self, costs: TraceCosts) -> float:
        ms = self.recomputed_prompt * costs.prefill_ms_per_token
        ms += sum(n * costs.load_ms_per_token.get(t, 0.0) for t, n in self.tier_tokens.items())
        return ms + self.blend_tokens * costs.full_layer_share * costs.prefill_ms_per_token


def craft_recompute(length: int, best_overlap: float, alpha: float, cci: float) -> int:
    """Cache-Craft's budget rule for one chunk: ceil(min(1, alpha x CCI x (1 - overlap)) x length)."""
    return min(length, math.ceil(min(1.0, alpha * cci * (1.0 - best_overlap)) * length - 1e-9))


class StrategyReplay:
    """One strategy's simulated store and its per-request accounting."""

    def __init__(self, strategy: SimStrategy, config: ReplayConfig, costs: TraceCosts) -> None:
        self.strategy, self.config, self.costs = strategy, config, costs
        self.variants: dict[int, list[tuple]] = defaultdict(list)  # chunk id -> held variant keys, oldest first
        self.store = SimStore(config.capacities(), config.policy, on_drop=self._dropped)
        expected = config.craft_alpha * config.cci if strategy.name == "cachecraft" else strategy.ratio or 0.0
        self.chunk_saving = max(0.0, 1.0 - expected)  # share of a chunk's prefill a hit saves

    def _dropped(self, key) -> None:
        if key[0] == "variant":
            held = self.variants.get(key[1])
            if held and key in held:
                held.remove(key)

    def _cost(self, tokens: int, saving: float) -> float:
        """What a hit on an entry saves: the prefill it avoids minus loading it from the first tier."""
        first = self.store.tiers[0].name
        return tokens * (saving * self.costs.prefill_ms_per_token - self.costs.load_ms_per_token.get(first, 0.0))

    def run(self, req: TraceRequest) -> RequestOutcome:
        segments = req.segments if self.strategy.name == "prefix" else req.sys_prompt
        keys = [("prefix", tuple(s.id for s in segments[: i + 1])) for i in range(len(segments))]
        self.store.pinned = set(keys)
        out = RequestOutcome(req.prompt_tokens, req.passage_tokens, 0, 0, dict.fromkeys(TIERS, 0))
        reused = 0
        for key, seg in zip(keys, segments):  # the longest cached prefix of blocks
            if key not in self.store:
                break
            out.tier_tokens[self.store.hit(key)] += seg.tokens
            reused += 1
        for key, seg in zip(keys[reused:], segments[reused:]):
            self.store.put(key, seg.tokens, self._cost(seg.tokens, 1.0))
        if self.strategy.name == "prefix":
            out.chunk_refs = len(req.passages)
            out.chunk_hits = sum(1 for s in segments[:reused] if s.part == "passages")
            out.recomputed_prompt = sum(s.tokens for s in segments[reused:])
            out.recomputed_chunk = sum(s.tokens for s in segments[reused:] if s.part == "passages")
            return out
        fresh = sum(s.tokens for s in segments[reused:]) + sum(s.tokens for s in req.history + req.user_input)
        chunk = self._craft(req, out) if self.strategy.name == "cachecraft" else self._blend(req, out)
        out.recomputed_chunk = chunk
        out.recomputed_prompt = fresh + chunk
        return out

    def _blend(self, req: TraceRequest, out: RequestOutcome) -> int:
        """cacheblend / epic: one position-independent entry per chunk."""
        keys = [("chunk", p.id) for p in req.passages]
        self.store.pinned |= set(keys)
        hit_tokens = missed = per_chunk = 0
        for key, p in zip(keys, req.passages):
            out.chunk_refs += 1
            if key in self.store:
                out.tier_tokens[self.store.hit(key)] += p.tokens
                out.chunk_hits += 1
                hit_tokens += p.tokens
                per_chunk += math.ceil(self.strategy.ratio * p.tokens - 1e-9)
            else:
                missed += p.tokens
                self.store.put(key, p.tokens, self._cost(p.tokens, self.chunk_saving))
        fixed = per_chunk if self.strategy.name == "epic" else math.ceil(self.strategy.ratio * hit_tokens - 1e-9)
        out.fixed_chunk = fixed
        if self.strategy.name == "cacheblend" and self.strategy.ratio > 0:
            out.blend_tokens = hit_tokens - fixed
        return missed + fixed

    def _craft(self, req: TraceRequest, out: RequestOutcome) -> int:
        """cachecraft: the best held variant per chunk, Cache-Craft's budget rule, new variants stored."""
        self.store.pinned |= {k for p in req.passages for k in self.variants.get(p.id, ())}
        recomputed = 0
        ids = [p.id for p in req.passages]
        for i, p in enumerate(req.passages):
            out.chunk_refs += 1
            before = tuple(ids[:i])
            held = self.variants.get(p.id, [])
            key = ("variant", p.id, before)
            if not held:
                recomputed += p.tokens
                out.chunk_overlaps.append(None)
                self._add_variant(key, p.tokens)
                continue
            scored = [(overlap(v[2], before), -n, v) for n, v in enumerate(held)]
            best, _, variant = max(scored)  # ties: the oldest variant
            out.tier_tokens[self.store.hit(variant)] += p.tokens
            out.chunk_hits += 1
            out.overlaps.append(best)
            out.held_variants.append(len(held))
            out.chunk_overlaps.append(best)
            held.remove(variant)
            held.append(variant)  # most recently used last
            fixed = craft_recompute(p.tokens, best, self.config.craft_alpha, self.config.cci)
            out.fixed_chunk += fixed
            recomputed += fixed
            if best < 1.0 and key not in held:
                self._add_variant(key, p.tokens)
        return recomputed

    def _add_variant(self, key: tuple, tokens: int) -> None:
        held = self.variants[key[1]]
        while len(held) >= self.config.max_variants:
            self.store.remove(held.pop(0))  # the chunk's least recently used variant
        self.store.pinned.add(key)
        if self.store.put(key, tokens, self._cost(tokens, self.chunk_saving)) is not None:
            held.append(key)


def summarize(outcomes: Sequence[RequestOutcome], costs: TraceCosts) -> dict:
    """Per-request means, token hit rate per tier, TTFT mean / p50 / p90, and cachecraft's variant use."""
    n = len(outcomes) or 1
    prompt = sum(o.prompt_tokens for o in outcomes) or 1
    ttft = sorted(o.ttft_ms(costs) for o in outcomes) or [0.0]
    refs = sum(o.chunk_refs for o in outcomes)
    hits = [h for o in outcomes for h in o.held_variants]
    overlaps = [x for o in outcomes for x in o.overlaps]
    return {
        "requests": len(outcomes),
        "prompt_tokens_per_request": prompt / n,
        "chunk_tokens_per_request": sum(o.chunk_tokens for o in outcomes) / n,
        "token_hit_rate": {t: sum(o.tier_tokens[t] for o in outcomes) / prompt for t in TIERS},
        "token_hit_rate_total": sum(sum(o.tier_tokens.values()) for o in outcomes) / prompt,
        "chunk_hit_rate": sum(o.chunk_hits for o in outcomes) / refs if refs else 0.0,
        "recomputed_prompt_tokens_per_request": sum(o.recomputed_prompt for o in outcomes) / n,
        "recomputed_chunk_tokens_per_request": sum(o.recomputed_chunk for o in outcomes) / n,
        "fixed_chunk_tokens_per_request": sum(o.fixed_chunk for o in outcomes) / n,
        "ttft_ms_mean": statistics.fmean(ttft),
        "ttft_ms_p50": ttft[len(ttft) // 2],
        "ttft_ms_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "full_prefill_ttft_ms_mean": prompt / n * costs.prefill_ms_per_token,
        "variant_hits": {str(k): hits.count(k) for k in sorted(set(hits))},
        "exact_variant_share": sum(1 for x in overlaps if x == 1.0) / len(overlaps) if overlaps else 0.0,
        "mean_overlap": statistics.fmean(overlaps) if overlaps else 0.0,
    }


def replay(
    requests: Iterable[TraceRequest],
    strategy: SimStrategy,
    config: ReplayConfig,
    costs: TraceCosts,
    keep: Iterable[int] = (),
) -> tuple[dict, dict[int, RequestOutcome]]:
    """Replay `requests` in order under one strategy and store; the summary, and the outcomes of the
    request indices in `keep`."""
    state = StrategyReplay(strategy, config, costs)
    keep = set(keep)
    outcomes, kept = [], {}
    for req in requests:
        outcome = state.run(req)
        outcomes.append(outcome)
        if req.index in keep:
            kept[req.index] = outcome
    return summarize(outcomes, costs), kept
