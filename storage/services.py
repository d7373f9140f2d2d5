"""StoreServices: what a TieredStore offers besides its entries, owned in one place.

- `metadata`: the chunk metadata store (storage/metadata.py), in the SQL catalog database of the first
  tier that has one (the disk tier's `catalog_url`), else in memory; made on first use, one per store.
- `leases`: the compute-once leases (storage/lease.py) over the first Redis tier, made on first use;
  None without a Redis tier.
- `remote_status()` / `degraded_warnings(since)`: the health of the remote tiers, every tier whose
  `status()` is not None (a local tier answers None: it has no link that can go down).

The TieredStore makes it (`store.services`) and closes it with itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .lease import ComputeLeases
from .metadata import MemoryMetadata, MetadataStore, SqlMetadata
from .redis_tier import RedisTier
from .tier import Tier


class StoreServices:
    """Chunk metadata, compute leases and remote-tier health of the store over `tiers`."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        self._lease_tier = next((t for t in self.tiers if isinstance(t, RedisTier)), None)
        self._metadata: MetadataStore | None = None
        self._leases: ComputeLeases | None = None
        self._lock = threading.Lock()

    @property
    def metadata(self) -> MetadataStore:
        """The store's one metadata store (SQL beside the first catalog, else in memory)."""
        with self._lock:
            if self._metadata is None:
                url = next((t.catalog_url for t in self.tiers if t.catalog_url), None)
                self._metadata = SqlMetadata(url) if url else MemoryMetadata()
            return self._metadata

    @property
    def leases(self) -> ComputeLeases | None:
        """The compute leases of the first Redis tier, or None without one."""
        if self._lease_tier is None:
            return None
        with self._lock:
            if self._leases is None:
                self._leases = ComputeLeases(self._lease_tier)
            return self._leases

    def remote_status(self) -> dict[str, dict]:
        """{tier name: its status (up, outages, failed_calls, last_error, ..., leases)} for remote tiers;
        `leases` is what the compute-once protocol did (None for a tier it has not run over)."""
        out = {}
        for t in self.tiers:
            status = t.status()
            if status is not None:
                used = self._leases if t is self._lease_tier else None
                out[t.name] = {**status, "leases": used.stats.to_dict() if used is not None else None}
        return out

    def degraded_warnings(self, since: float | None = None) -> list[str]:
        """One sentence per remote tier that is unreachable now, or failed a call after `since` (a
        `time.perf_counter()` value, e.g. the start of a request); empty when all served."""
        return [
            f"cache tier {name!r} is unreachable ({s.get('last_error')}): answered from local tiers, "
            "misses recomputed; reconnecting with backoff"
            for name, s in self.remote_status().items()
            if not s.get("up", True) or (since is not None and (s.get("last_failure_at") or float("-inf")) >= since)
        ]

    def close(self) -> None:
        with self._lock:
            if self._metadata is not None:
                self._metadata.close()
