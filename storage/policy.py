"""Eviction policies, chosen by name: `lru`, `cost` (GDSF-like, keeps the most recompute per byte) and
`utility` (recent reuse x compute saved / bytes, reuse decaying with a half-life).

A policy scores entries (lowest `priority` goes first; ties go to the least recently used, then the
key) and keeps per-tier state (GDSF's inflation value L). One policy instance per tier.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

from .entry import EntryInfo


class Policy(ABC):
    """Scores entries of one tier and picks the next victim."""

    name: str

    def on_insert(self, info: EntryInfo, clock: int) -> None:
        """A new entry arrived (its `hits` carry over from another tier, at least 1)."""
        info.hits = max(info.hits, 1)
        info.last_access = clock
        info.priority = self.score(info)

    def on_hit(self, info: EntryInfo, clock: int) -> None:
        """The entry was read."""
        info.hits += 1
        info.last_access = clock
        info.priority = self.score(info)

    def on_evict(self, info: EntryInfo) -> None:
        """The entry left the tier (hook for aging state)."""

    def restore(self, infos: Iterable[EntryInfo]) -> None:
        """Rebuild state from persisted entries after a restart."""

    @abstractmethod
    def score(self, info: EntryInfo) -> float:
        """The entry's priority now."""

    def victim(self, infos: Iterable[EntryInfo], exclude: set) -> EntryInfo | None:
        """The entry to evict next among those whose key is not in `exclude` (None if none)."""
        candidates = [i for i in infos if i.key not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda i: (i.priority, i.last_access, str(i.key)))


class LRUPolicy(Policy):
    """Least recently used first."""

    name = "lru"

    def score(self, info: EntryInfo) -> float:
        return float(info.last_access)


class CostAwarePolicy(Policy):
    """GDSF: priority = L + hits x cost / bytes; L rises to each victim's priority (ages old entries)."""

    name = "cost"

    def __init__(self) -> None:
        self.inflation = 0.0  # L

    def score(self, info: EntryInfo) -> float:
        return self.inflation + info.hits * info.cost / max(info.nbytes, 1)

    def on_evict(self, info: EntryInfo) -> None:
        self.inflation = max(self.inflation, info.priority)

    def restore(self, infos: Iterable[EntryInfo]) -> None:
        self.inflation = min((i.priority for i in infos), default=0.0)


class UtilityPolicy(Policy):
    """Utility = reuse x compute saved / bytes, where reuse counts hits decaying by half every `half_life`
    clock ticks (so a chunk popular last week yields to one popular now) and `EntryInfo.cost` is the
    compute a hit saves. Scores are log2 of the utility plus `last_access / half_life`: the decay is the
    same for every entry at a given time, so that order never changes between accesses (a static score,
    no rescoring of idle entries)."""

    name = "utility"

    def __init__(self, half_life: float = 4096.0) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.half_life = half_life
        self.reuse: dict = {}  # key -> decayed hit count as of the entry's last_access

    def on_insert(self, info: EntryInfo, clock: int) -> None:
        info.hits = max(info.hits, 1)
        self.reuse[info.key] = float(info.hits)
        info.last_access = clock
        info.priority = self.score(info)

    def on_hit(self, info: EntryInfo, clock: int) -> None:
        decayed = self.reuse.get(info.key, float(info.hits)) * 2.0 ** (-(clock - info.last_access) / self.half_life)
        self.reuse[info.key] = decayed + 1.0
        info.hits += 1
        info.last_access = clock
        info.priority = self.score(info)

    def on_evict(self, info: EntryInfo) -> None:
        self.reuse.pop(info.key, None)

    def restore(self, infos: Iterable[EntryInfo]) -> None:
        self.reuse = {i.key: float(max(i.hits, 1)) for i in infos}

    def score(self, info: EntryInfo) -> float:
        reuse = self.reuse.get(info.key, float(max(info.hits, 1)))
        utility = reuse * max(info.cost, 1e-9) / max(info.nbytes, 1)
        return math.log2(utility) + info.last_access / self.half_life


POLICIES: dict[str, type[Policy]] = {
    "lru": LRUPolicy,
    "cost": CostAwarePolicy,
    "gdsf": CostAwarePolicy,
    "utility": UtilityPolicy,
}


def make_policy(name: str) -> Policy:
    """A fresh policy called `name`; unknown names fail listing the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None
