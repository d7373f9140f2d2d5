"""`make_strategy`: a strategy by name (`"cacheblend+query"` selects cacheblend's query mode)."""

from __future__ import annotations

from dataclasses import replace

from .cachecraft import CacheCraft
from .config import BlendConfig, split_name, validate
from .focus import Focus
from .strategies import STRATEGY_CLASSES, Strategy

CLASSES: dict[str, type[Strategy]] = {**STRATEGY_CLASSES, CacheCraft.name: CacheCraft, Focus.name: Focus}


def make_strategy(name: str, ratio: float = 0.0, config: BlendConfig = BlendConfig()) -> Strategy:
    """The strategy called `name` at recompute ratio `ratio` (unknown names fail listing the known);
    `"cacheblend+query"` is cacheblend with `config.select = "query"`."""
    validate(name, ratio)
    base, select = split_name(name)
    if select is not None:
        config = replace(config, select=select)
    return CLASSES[base](ratio, config)
