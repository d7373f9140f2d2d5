"""Health of a store's remote tiers (Redis): what a degraded answer's warning and the metrics report.

A tier whose `status()` is not None (RedisTier) is remote; while its link is down the store serves from
the local tiers and recomputes misses, and `degraded_warnings` says so in words an answer can carry.
The store's services (`store.services`, storage/services.py) hold the answers; these are accessors.
"""

from __future__ import annotations

from .tiered import TieredStore


def remote_status(store: TieredStore) -> dict[str, dict]:
    """{tier name: its status dict (up, outages, failed_calls, last_error, ...)} for remote tiers."""
    return store.services.remote_status()


def degraded_warnings(store: TieredStore, since: float | None = None) -> list[str]:
    """One sentence per remote tier that is unreachable now, or failed a call after `since` (a
    `time.perf_counter()` value, e.g. the start of a request); empty when all served."""
    return store.services.degraded_warnings(since)
