"""RedisLink: one Redis connection shared by the Redis tier and the compute leases, which turns an outage
into a state instead of an exception.

Every call goes through `call(fn)`: a connection or timeout error marks the link down (a warning is
logged once, `outages` counts it) and returns the caller's fallback; while down, calls return the
fallback at once until the backoff (0.5 s doubling to 30 s) has passed, then one call probes again.
So a sidecar whose Redis is gone answers from its local tiers, never raises for it, and reconnects by
itself when Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisLink:
    """A redis-py client at `url` plus outage bookkeeping (`up`, `outages`, `last_error`, backoff)."""

    def __init__(
        self,
        url: str,
        connect_timeout_s: float = 0.5,
        timeout_s: float = 2.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        try:
            import redis
        except ImportError as err:  # pragma: no cover - the `redis` extra is not installed
            raise ImportError("the Redis tier needs redis-py: pip install 'ragkv[redis]'") from err
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s, health_check_interval=0
        )
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._refusals = redis.RedisError  # Redis answered with an error (OOM, wrong type): not an outage
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._delay = backoff_s
        self._retry_at = 0.0  # monotonic time of the next probe while down
        self._lock = threading.Lock()
        self.up = True
        self.outages = 0  # times the link went down
        self.failed_calls = 0  # calls answered by their fallback because Redis was unreachable
        self.last_error: str | None = None
        self.last_failure_at: float | None = None  # time.perf_counter() of the last call answered by its fallback

    def call(self, fn: Callable[[object], T], fallback: T) -> T:
        """`fn(client)`, or `fallback` when Redis is unreachable (now, or within the current backoff) or
        refuses the command (`last_error` says why)."""
        with self._lock:
            if not self.up and time.monotonic() < self._retry_at:
                self.failed_calls += 1
                self.last_failure_at = time.perf_counter()
                return fallback
        try:
            out = fn(self.client)
        except self._errors as err:
            self._down(err)
            return fallback
        except self._refusals as err:
            with self._lock:
                self.failed_calls += 1
                self.last_failure_at = time.perf_counter()
                self.last_error = f"{type(err).__name__}: {err}"
            log.warning("Redis at %s refused a command: %s", self._safe_url(), self.last_error)
            return fallback
        if not self.up:
            with self._lock:
                self.up, self._delay = True, self.backoff_s
            log.warning("Redis at %s is reachable again", self._safe_url())
        return out

    def ping(self) -> bool:
        """Whether Redis answers now (resets the backoff)."""
        with self._lock:
            self._retry_at = 0.0
        return bool(self.call(lambda r: r.ping(), False))

    def status(self) -> dict:
        """JSON-able health: up, outages, calls answered by fallback, last error."""
        return {
            "up": self.up,
            "outages": self.outages,
            "failed_calls": self.failed_calls,
            "last_error": self.last_error,
            "last_failure_at": self.last_failure_at,
        }

    def close(self) -> None:
        self.client.close()

    def _down(self, err: Exception) -> None:
        with self._lock:
            self.failed_calls += 1
            self.last_failure_at = time.perf_counter()
            self.last_error = f"{type(err).__name__}: {err}"
            self._retry_at = time.monotonic() + self._delay
            delay, self._delay = self._delay, min(self._delay * 2, self.max_backoff_s)
            was_up, self.up = self.up, False
            if was_up:
                self.outages += 1
        if was_up:
            log.warning(
                "Redis at %s unreachable (%s): serving from local tiers, retrying in %.1f s",
                self._safe_url(),
                self.last_error,
                delay,
            )

    def _safe_url(self) -> str:
        """The URL without a password."""
        head, at, tail = self.url.rpartition("@")
        return f"{head.split('://')[0]}://***@{tail}" if at else self.url
