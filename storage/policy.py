"""Eviction policies, chosen by name: `lru`, and `cost` (GDSF-like, keeps the most recompute per byte).

A policy scores entries (lowest `priority` goes first; ties go to the least recently used, then the
key) and keeps per-tier state (GDSF's inflation value L). One policy instance per tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from .tier import EntryInfo


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


POLICIES: dict[str, type[Policy]] = {"lru": LRUPolicy, "cost": CostAwarePolicy, "gdsf": CostAwarePolicy}


def make_policy(name: str) -> Policy:
    """A fresh policy called `name`; unknown names fail listing the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None
