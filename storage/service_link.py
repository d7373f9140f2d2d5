"""ServiceLink: calls to a network service (Redis, PostgreSQL) that turn an outage into a state instead of
an exception.

Every call goes through `call(fn, fallback)`: one of the link's connection errors marks it down (a
warning is logged once, `outages` counts it) and returns the caller's fallback; while down, calls return
the fallback at once until the backoff (0.5 s doubling to 30 s) has passed, then one call probes again.
A call made with `eager=True` (a caller about to do something expensive, like precomputing a chunk)
probes as soon as `backoff_s` has passed since the last try, whatever the doubled backoff says, so a
service that came back is seen before the expensive work instead of up to 30 s later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class ServiceLink:
    """`client` (set by the subclass) plus outage bookkeeping (`up`, `outages`, `last_error`, backoff).

    `errors` are the exceptions that mean "unreachable" (the link goes down); `refusals` mean the
    service answered with an error (not an outage: the call gets its fallback, the link stays up)."""

    what = "service"  # how log lines name it

    def __init__(
        self,
        errors: tuple[type[BaseException], ...],
        refusals: tuple[type[BaseException], ...] = (),
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.client = None
        self._errors = errors
        self._refusals = refusals
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._delay = backoff_s
        self._retry_at = 0.0  # monotonic time of the next probe while down
        self._tried_at = 0.0  # monotonic time of the last call that reached the service
        self._lock = threading.Lock()
        self.up = True
        self.outages = 0  # times the link went down
        self.failed_calls = 0  # calls answered by their fallback because the service was unreachable
        self.last_error: str | None = None
        self.last_failure_at: float | None = None  # time.perf_counter() of the last call answered by its fallback

    def call(self, fn: Callable[[object], T], fallback: T, eager: bool = False) -> T:
        """`fn(client)`, or `fallback` when the service is unreachable (now, or within the current backoff;
        with `eager`, within `backoff_s` of the last try) or refuses the call (`last_error` says why)."""
        with self._lock:
            now = time.monotonic()
            waiting = now < (self._tried_at + self.backoff_s if eager else self._retry_at)
            if not self.up and waiting:
                self.failed_calls += 1
                self.last_failure_at = time.perf_counter()
                return fallback
            self._tried_at = now
        try:
            out = fn(self.client)
        except self._errors as err:
            if not self.is_outage(err):
                raise
            self._down(err)
            return fallback
        except self._refusals as err:
            with self._lock:
                self.failed_calls += 1
                self.last_failure_at = time.perf_counter()
                self.last_error = f"{type(err).__name__}: {err}"
            log.warning("%s at %s refused a call: %s", self.what, self.safe_url(), self.last_error)
            return fallback
        if not self.up:
            with self._lock:
                self.up, self._delay = True, self.backoff_s
            log.warning("%s at %s is reachable again", self.what, self.safe_url())
        return out

    def status(self) -> dict:
        """JSON-able health: up, outages, calls answered by fallback, last error."""
        return {
            "up": self.up,
            "outages": self.outages,
            "failed_calls": self.failed_calls,
            "last_error": self.last_error,
            "last_failure_at": self.last_failure_at,
        }

    def safe_url(self) -> str:
        """Where the service is, without a password (subclasses know their URL)."""
        return "?"

    def is_outage(self, err: BaseException) -> bool:
        """Whether an error of the `errors` kinds means the service is unreachable (else it is raised)."""
        return True

    def _down(self, err: BaseException) -> None:
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
                "%s at %s unreachable (%s): serving from local state, retrying in %.1f s",
                self.what,
                self.safe_url(),
                self.last_error,
                delay,
            )


def url_without_password(url: str) -> str:
    """`scheme://user:pw@host/...` -> `scheme://***@host/...`."""
    head, at, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if at else url
