"""BlendConfig: how cached chunks are fused (strategy, recompute ratio, CacheBlend's check layers)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("full", "prefix", "naive", "cacheblend", "epic")
DEVIATIONS = ("v", "k", "kv")
SCORES = ("deviation", "attention", "deviation*attention")


@dataclass(frozen=True)
class BlendConfig:
    """Defaults for every request; each request may override strategy and ratio."""

    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)  # CacheBlend selects tokens here; earlier layers run in full
    gradual_factor: float = 2.0  # gradual filtering: each earlier check layer keeps this many times more
    deviation: str = "v"  # compare fresh vs cached values ("v"), keys ("k") or both ("kv")
    score: str = "deviation"  # rank by KV deviation, by the query's attention, or by their product

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
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"unknown deviation {self.deviation!r}; accepted: {', '.join(DEVIATIONS)}")


def validate(strategy: str, ratio: float) -> None:
    """Raise a clear error for an unknown strategy or a ratio outside [0, 1]."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
    if not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"recompute_ratio must be within [0, 1], got {ratio}")
