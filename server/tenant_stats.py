"""Per-tenant cache statistics for `GET /v1/cache/stats`: a tenant sees only its own entries and counters.

Entries and bytes per tier are counted over the keys of the tenant's namespace (chunk keys carry it);
hits per tier, misses and puts (a miss is computed and stored) are counted per namespace from the
answers this server produced. Capacities are the server's configuration; other tenants' numbers and
store-wide counters (evictions, write errors, their last message) are not shown.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict


class TenantCounters:
    """Hits per tier, misses and requests per namespace, from the answers served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, Counter] = defaultdict(Counter)
        self._misses: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()

    def observe(self, namespace: str, answer) -> None:
        with self._lock:
            self._hits[namespace].update(answer.hits)
            self._misses[namespace] += answer.misses
            self._requests[namespace] += 1

    def snapshot(self, namespace: str) -> tuple[dict[str, int], int, int]:
        """(hits per tier, misses, requests) of `namespace`."""
        with self._lock:
            return dict(self._hits.get(namespace, {})), self._misses[namespace], self._requests[namespace]


def tenant_store_stats(store, namespace: str, counters: TenantCounters) -> dict:
    """The store stats dict (`StoreStats.to_dict()` fields) restricted to `namespace`."""
    hits, misses, requests = counters.snapshot(namespace)
    tiers = []
    for t in store.tiers:
        mine = [i for i in t.infos() if i.key.namespace == namespace]
        tiers.append(
            {
                "name": t.name,
                "codec": t.codec.name,
                "entries": len(mine),
                "bytes": sum(i.nbytes for i in mine),
                "capacity_bytes": t.capacity_bytes,
                "hits": hits.get(t.name, 0),
                "evictions": 0,  # not tracked per tenant
                "corrupt": t.corrupt_in(namespace),  # entries dropped as corrupt (never served)
            }
        )
    return {
        "scope": "tenant",
        "tiers": tiers,
        "requests": requests,
        "misses": misses,
        "puts": misses,
        "promotions": 0,
        "demotions": 0,
        "dropped": 0,
        "write_errors": 0,
        "last_error": None,
        "hits": {t["name"]: t["hits"] for t in tiers},
        "corrupt": sum(t["corrupt"] for t in tiers),
        "evictions": 0,
    }
