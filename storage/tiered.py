"""TieredStore: the store the Engine reads chunk KV through, over an ordered list of tiers.

`lookup` says which tier holds each key without I/O; `get` reads from the fastest tier that has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..chunk_cache import ChunkKey, ChunkKV
from .tier import Tier


@dataclass
class StoreStats:
    """Counters of a TieredStore."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: int = 0
    puts: int = 0


class TieredStore:
    """Ordered tiers, fastest first."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.stats = StoreStats(hits={t.name: 0 for t in self.tiers})

    def lookup(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """For each key, the name of the fastest tier holding it, or None."""
        return [next((t.name for t in self.tiers if t.lookup(k)), None) for k in keys]

    def get(self, key: ChunkKey) -> ChunkKV | None:
        for tier in self.tiers:
            kv = tier.get(key)
            if kv is not None:
                self.stats.hits[tier.name] += 1
                return kv
        self.stats.misses += 1
        return None

    def put(self, key: ChunkKey, kv: ChunkKV) -> None:
        self.tiers[0].put(key, kv)
        self.stats.puts += 1

    def remove(self, key: ChunkKey) -> bool:
        return any([t.remove(key) for t in self.tiers])
