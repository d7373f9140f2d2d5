"""A simulated tiered KV store for trace replay: tiers of token capacity (GPU, CPU, disk), no bytes held.

Each tier keeps `EntryInfo` bookkeeping and evicts by its own instance of a storage/policy.py policy
(`lru`, `cost`, `utility`), found through a lazy heap (the order of `Policy.victim`: lowest priority,
then least recent). As in `TieredStore`: new entries go to the first tier that can hold them, a victim
is demoted to the next tier (the last tier drops it), a hit in a lower tier is promoted to the first
tier, and keys pinned for the request being assembled are never victims. Sizes are in tokens (`nbytes`
of an entry = its tokens: every entry has the same KV bytes per token, so the policies' order is that of
bytes). Keys are any hashable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from ..storage.policy import Policy, make_policy
from ..storage.tier import EntryInfo


@dataclass
class SimTier:
    """One tier: a token budget, the entries it holds and its policy."""

    name: str
    capacity: int
    policy: Policy
    held: dict[Hashable, EntryInfo] = field(default_factory=dict)
    heap: list = field(default_factory=list)  # (priority, last_access, seq, key); stale rows skipped
    used: int = 0

    def push(self, info: EntryInfo, seq: int) -> None:
        heapq.heappush(self.heap, (info.priority, info.last_access, seq, info.key))

    def pop_victim(self, pinned: set) -> EntryInfo | None:
        """Remove and return the policy's victim among unpinned entries (None if there is none)."""
        kept = []
        victim = None
        while self.heap:
            row = heapq.heappop(self.heap)
            prio, last, _, key = row
            info = self.held.get(key)
            if info is None or info.priority != prio or info.last_access != last:
                continue  # a stale row
            if key in pinned:
                kept.append(row)
                continue
            victim = info
            break
        for row in kept:
            heapq.heappush(self.heap, row)
        if victim is not None:
            del self.held[victim.key]
            self.used -= victim.nbytes
            self.policy.on_evict(victim)
        return victim


class SimStore:
    """Tiers in order (fastest first); `on_drop(key)` is called when a key leaves the last tier."""

    def __init__(
        self,
        capacities: Iterable[tuple[str, int]],
        policy: str,
        on_drop: Callable[[Hashable], None] | None = None,
    ) -> None:
        self.tiers = [SimTier(name, int(cap), make_policy(policy)) for name, cap in capacities if int(cap) > 0]
        if not self.tiers:
            raise ValueError("a simulated store needs at least one tier with capacity > 0")
        self.on_drop = on_drop
        self.clock = 0
        self._seq = itertools.count()
        self.pinned: set = set()

    def where(self, key: Hashable) -> str | None:
        """The tier holding `key`, without side effects."""
        for tier in self.tiers:
            if key in tier.held:
                return tier.name
        return None

    def __contains__(self, key: Hashable) -> bool:
        return self.where(key) is not None

    def info(self, key: Hashable) -> EntryInfo | None:
        for tier in self.tiers:
            if key in tier.held:
                return tier.held[key]
        return None

    def hit(self, key: Hashable) -> str:
        """Read a held key: returns the tier it was read from; a lower-tier hit is promoted to the first."""
        self.clock += 1
        for i, tier in enumerate(self.tiers):
            info = tier.held.get(key)
            if info is None:
                continue
            if i == 0:
                tier.policy.on_hit(info, self.clock)
                tier.push(info, next(self._seq))
            else:
                del tier.held[key]
                tier.used -= info.nbytes
                tier.policy.on_evict(info)
                info.hits += 1
                self._insert(0, info)
            return tier.name
        raise KeyError(f"{key!r} is not held")

    def put(self, key: Hashable, tokens: int, cost: float) -> str | None:
        """Store a computed entry of `tokens` tokens whose hit saves `cost`; the tier it went to (None if
        no tier can hold it). A key already held is left where it is."""
        where = self.where(key)
        if where is not None:
            return where
        self.clock += 1
        return self._insert(0, EntryInfo(key, int(tokens), int(tokens), float(cost)))

    def remove(self, key: Hashable) -> bool:
        """Drop a key from whichever tier holds it (no demotion, no `on_drop`)."""
        for tier in self.tiers:
            info = tier.held.pop(key, None)
            if info is not None:
                tier.used -= info.nbytes
                tier.policy.on_evict(info)
                return True
        return False

    def _insert(self, index: int, info: EntryInfo) -> str | None:
        """Place `info` in tier `index` or, if it is larger than that tier, the next one that can hold it;
        victims cascade down. Returns the tier's name (None: dropped)."""
        while index < len(self.tiers) and info.nbytes > self.tiers[index].capacity:
            index += 1
        if index >= len(self.tiers):
            if self.on_drop:
                self.on_drop(info.key)
            return None
        tier = self.tiers[index]
        tier.policy.on_insert(info, self.clock)
        while tier.used + info.nbytes > tier.capacity:
            victim = tier.pop_victim(self.pinned)
            if victim is None:  # everything left is pinned: the newcomer goes down instead
                tier.policy.on_evict(info)
                return self._insert(index + 1, info)
            self._demote(index, victim)
        info.priority = tier.policy.score(info)  # GDSF's inflation may have risen while evicting
        tier.held[info.key] = info
        tier.used += info.nbytes
        tier.push(info, next(self._seq))
        return tier.name

    def _demote(self, index: int, info: EntryInfo) -> None:
        if index + 1 < len(self.tiers):
            self._insert(index + 1, info)
        elif self.on_drop:
            self.on_drop(info.key)
