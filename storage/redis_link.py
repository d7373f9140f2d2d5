"""RedisLink: one Redis connection shared by the Redis tier and the compute leases, which turns an outage
into a state instead of an exception (the bookkeeping is `ServiceLink`'s).

A connection or timeout error marks the link down (a warning is logged once, `outages` counts it) and
the call returns the caller's fallback; while down, calls return the fallback at once until the
backoff (0.5 s doubling to 30 s) has passed, then one call probes again. So a sidecar whose Redis is
gone answers from its local tiers, never raises for it, and reconnects by itself when Redis is back.
"""

from __future__ import annotations

from .service_link import ServiceLink, url_without_password


class RedisLink(ServiceLink):
    """A redis-py client at `url` plus outage bookkeeping (`up`, `outages`, `last_error`, backoff)."""

    what = "Redis"

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
        # Redis answering with an error (OOM, wrong type) is a refusal, not an outage
        unreachable = (redis.ConnectionError, redis.TimeoutError, OSError)
        super().__init__(unreachable, (redis.RedisError,), backoff_s, max_backoff_s)
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s, health_check_interval=0
        )

    def ping(self) -> bool:
        """Whether Redis answers now (resets the backoff)."""
        with self._lock:
            self._retry_at = 0.0
        return bool(self.call(lambda r: r.ping(), False))

    def close(self) -> None:
        self.client.close()

    def safe_url(self) -> str:
        return url_without_password(self.url)
