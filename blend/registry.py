"""The strategy called by a name: `make_strategy("cacheblend+query", 0.15, config)`.

Every strategy class by its name, cachecraft's included (blend/cachecraft.py builds on
blend/strategies.py's `Strategy`, so neither of them can hold this table without an import circle).
"""

from __future__ import annotations

from dataclasses import replace

from .cachecraft import CacheCraft
from .config import BlendConfig, split_name, validate
from .strategies import CacheBlend, Epic, Full, Naive, Prefix, Strategy

STRATEGY_CLASSES: dict[str, type[Strategy]] = {c.name: c for c in (Full, Prefix, Naive, CacheBlend, Epic, CacheCraft)}


def make_strategy(name: str, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> Strategy:
    """The strategy called `name` at recompute ratio `ratio` (unknown names fail listing the known);
    `"cacheblend+query"` is cacheblend with `config.select = "query"`."""
    validate(name, ratio)
    base, select = split_name(name)
    if select is not None:
        config = replace(config, select=select)
    return STRATEGY_CLASSES[base](ratio, config)
