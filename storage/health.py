"""Health of a store's remote tiers (Redis): what a degraded answer's warning and the metrics report.

A tier with a `status()` method (RedisTier) is remote; while its link is down the store serves from
the local tiers and recomputes misses, and `degraded_warnings` says so in words an answer can carry.
"""

from __future__ import annotations

from .tiered import TieredStore


def remote_status(store: TieredStore) -> dict[str, dict]:
    """{tier name: its status dict (up, outages, failed_calls, last_error, ...)} for remote tiers."""
    tiers = getattr(store, "tiers", ())  # stand-in stores (tests) may have none
    return {t.name: t.status() for t in tiers if callable(getattr(t, "status", None))}


def degraded_warnings(store: TieredStore, since: float | None = None) -> list[str]:
    """One sentence per remote tier that is unreachable now, or failed a call after `since` (a
    `time.perf_counter()` value, e.g. the start of a request); empty when all served."""
    return [
        f"cache tier {name!r} is unreachable ({s.get('last_error')}): answered from local tiers, "
        "misses recomputed; reconnecting with backoff"
        for name, s in remote_status(store).items()
        if not s.get("up", True) or (since is not None and (s.get("last_failure_at") or float("-inf")) >= since)
    ]
