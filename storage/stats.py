"""StoreStats: a JSON-able snapshot of a TieredStore's counters (for `ragkv cache stats`, metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TierStats:
    """One tier: what it holds and what happened to it."""

    name: str
    codec: str
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    evictions: int  # entries pushed out of this tier (demoted or dropped)
    corrupt: int  # entries found corrupt on read (dropped, never served)


@dataclass(frozen=True)
class StoreStats:
    """The whole store; `tiers` fastest first."""

    tiers: list[TierStats] = field(default_factory=list)
    misses: int = 0
    puts: int = 0
    promotions: int = 0
    demotions: int = 0
    dropped: int = 0  # entries evicted out of the last tier
    write_errors: int = 0
    last_error: str | None = None

    @property
    def hits(self) -> dict[str, int]:
        return {t.name: t.hits for t in self.tiers}

    @property
    def corrupt(self) -> int:
        return sum(t.corrupt for t in self.tiers)

    @property
    def evictions(self) -> int:
        return sum(t.evictions for t in self.tiers)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (with the derived totals)."""
        d = asdict(self)
        d.update(hits=self.hits, corrupt=self.corrupt, evictions=self.evictions)
        return d
