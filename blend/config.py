"""BlendConfig: how cached chunks are fused (strategy, recompute ratio, CacheBlend's check layers)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("full", "prefix", "naive", "cacheblend", "epic", "cachecraft", "focus")
DEVIATIONS = ("v", "k", "kv")
SCORES = ("deviation", "attention", "deviation*attention")
# how cacheblend/cachecraft pick tokens: at a check layer ("check"), or before layer 0 by the question's
# attention in a scout pass ("query"); a strategy name may carry it: "cacheblend+query"
SELECTIONS = ("check", "query")
SELECTIVE = ("cacheblend", "cachecraft")  # the strategies that take a selection suffix
CRAFT_SERVE = ("off", "recurring", "always")  # when the serving path stores exact KV variants (cachecraft)
RATIO_FREE = ("full", "prefix", "naive")  # reuse nothing, or exactly: no recompute ratio in their label


@dataclass(frozen=True)
class BlendConfig:
    """Defaults for every request; each request may override strategy and ratio."""

    strategy: str = "focus"  # the default since issue 21; cacheblend stays as the paper's baseline
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)  # CacheBlend selects tokens here; earlier layers run in full
    gradual_factor: float = 2.0  # gradual filtering: each earlier check layer keeps this many times more
    deviation: str = "v"  # compare fresh vs cached values ("v"), keys ("k") or both ("kv")
    score: str = "deviation"  # rank by KV deviation, by the query's attention, or by their product
    select: str = "check"  # "check": at check layers (CacheBlend); "query": by a scout pass before layer 0
    # layers whose question attention ranks tokens when select="query" (those past the model's depth are
    # dropped; none left: its last layer). Deep layers measured best: docs/BENCHMARKS.md
    scout_layers: tuple[int, ...] = (2, 6, 12, 20, 29)
    craft_alpha: float = 0.0  # cachecraft: chunk budget = alpha * CCI * (1 - overlap); 0 = scale to the ratio
    craft_min_share: float = 0.25  # cachecraft: each chunk keeps at least this share of its even budget
    craft_variants: int = 2  # cachecraft: KV variants kept per chunk (by preceding chunks); 0 = none stored or used
    craft_focus: float = 0.0  # cachecraft early stop: chunks under this share of the question's attention: no fix
    # focus (blend/focus.py): adaptive budget when focus_mass > 0 (question-attention mass to cover, between
    # focus_floor and the request's ratio), neighbours widened, last tokens of each chunk, dual-stage weight
    focus_mass: float = 0.7
    focus_floor: float = 0.1  # 0.05 stopped at 7-9% on 10-passage prompts, where 15% answered better
    focus_radius: int = 0
    focus_tail: int = 0
    focus_deviation: float = 0.0
    craft_serve: str = "recurring"  # cachecraft requests store exact variants: off | recurring (2nd time) | always
    # greedy answers: a step whose top-1 minus top-2 logit is under this is decided on exact KV (one full
    # prefill, then exact to the end; engine/answer_guard.py); 0 = off. 0.2: the top two within 18% in
    # probability; on 20 MuSiQue questions, same answers 0.80 against 0.60 at 0.1 (read whole), switches
    # 55% against 30% (docs/BENCHMARKS.md, "The answer guard looks back")
    answer_guard: float = 0.2

    def __post_init__(self) -> None:
        validate(self.strategy, self.recompute_ratio)
        if not self.check_layers or list(self.check_layers) != sorted(set(self.check_layers)):
            raise ValueError(f"check_layers must be strictly increasing and non-empty, got {self.check_layers}")
        if self.check_layers[0] < 1:
            raise ValueError(
                "check layers start at 1: layer 0's K/V do not depend on context, so it cannot rank tokens"
            )
        if self.gradual_factor < 1.0:
            raise ValueError(f"gradual_factor must be >= 1, got {self.gradual_factor}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; accepted: {', '.join(SCORES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown select {self.select!r}; accepted: {', '.join(SELECTIONS)}")
        if not self.scout_layers or min(self.scout_layers) < 0:
            raise ValueError(f"scout_layers must be non-empty layer indices >= 0, got {self.scout_layers}")
        if self.craft_alpha < 0.0:
            raise ValueError(f"craft_alpha must be >= 0 (0 scales budgets to the ratio), got {self.craft_alpha}")
        if not (0.0 <= self.craft_min_share <= 1.0):
            raise ValueError(f"craft_min_share must be within [0, 1], got {self.craft_min_share}")
        if self.craft_variants < 0:
            raise ValueError(f"craft_variants must be >= 0 (0 stores and uses no variants), got {self.craft_variants}")
        if not (0.0 <= self.craft_focus < 1.0):
            raise ValueError(f"craft_focus must be within [0, 1) (0: no early stop), got {self.craft_focus}")
        if not (0.0 <= self.focus_mass <= 1.0) or not (0.0 <= self.focus_floor <= 1.0):
            raise ValueError(
                f"focus_mass and focus_floor must lie within [0, 1], got {self.focus_mass}, {self.focus_floor}"
            )
        if self.focus_radius < 0 or self.focus_tail < 0:
            raise ValueError(f"focus_radius and focus_tail must be >= 0, got {self.focus_radius}, {self.focus_tail}")
        if not (0.0 <= self.focus_deviation <= 1.0):
            raise ValueError(f"focus_deviation must lie within [0, 1], got {self.focus_deviation}")
        if self.answer_guard < 0.0:
            raise ValueError(f"answer_guard is a logit margin >= 0 (0 = off), got {self.answer_guard}")
        if self.craft_serve not in CRAFT_SERVE:
            raise ValueError(f"unknown craft_serve {self.craft_serve!r}; accepted: {', '.join(CRAFT_SERVE)}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"unknown deviation {self.deviation!r}; accepted: {', '.join(DEVIATIONS)}")


def split_name(strategy: str) -> tuple[str, str | None]:
    """`"cacheblend+query"` -> ("cacheblend", "query"); a plain name has no selection suffix (None)."""
    base, plus, select = strategy.partition("+")
    if base not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if not plus:
        return base, None
    if base not in SELECTIVE or select not in SELECTIONS:
        raise ValueError(
            f"unknown strategy {strategy!r}: a selection suffix is accepted only on "
            f"{', '.join(SELECTIVE)}, one of +{', +'.join(SELECTIONS)}"
        )
    return base, select


def parse_strategy(text: str) -> tuple[str, float | None]:
    """The one strategy-spec parser: `"cacheblend@0.15"` -> ("cacheblend", 0.15), `"cacheblend+query"` ->
    ("cacheblend+query", None) (no ratio given). An unknown name, a ratio that is not a number or one
    outside [0, 1] fails saying what is accepted."""
    name, at, ratio = text.strip().partition("@")
    split_name(name)
    if not at:
        return name, None
    try:
        value = float(ratio)
    except ValueError:
        raise ValueError(f"strategy {text!r}: the recompute ratio after '@' must be a number in [0, 1]") from None
    validate(name, value)
    return name, value


def strategy_label(strategy: str, ratio: float | None = None) -> str:
    """The one label of a strategy at a recompute ratio: `full`, `prefix`, `naive` and a strategy given
    no ratio (None) by name, the others `name@ratio` (`cacheblend@0.15`, `cacheblend+query@0.15`);
    `parse_strategy` reads it back."""
    base, _ = split_name(strategy)
    return strategy if base in RATIO_FREE or ratio is None else f"{strategy}@{float(ratio):g}"


def validate(strategy: str, ratio: float) -> None:
    """Raise a clear error for an unknown strategy or a ratio outside [0, 1]."""
    split_name(strategy)
    if not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"recompute_ratio must be within [0, 1], got {ratio}")
