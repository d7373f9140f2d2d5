"""PinLedger: what the producer keeps alive for its consumer, bounded by bytes, never evicting early.

Each published entry is pinned (its GPU tensors, shared-memory mapping or file kept) from publish
until the consumer has it: the connector reports the load (an ack file, `FusedKVStore.reap`), or the
upstream answered the request (`release`), or `max_pin_s` passed (a consumer that died). A new entry
that does not fit in `budget_bytes` beside the pinned ones is refused (`admit` returns the reason),
so the request falls back to a full prefill by the inference server; an entry is never dropped to
make room while its consumer may still be reading it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Pin:
    nbytes: int
    since: float
    release: Callable[[], None]  # frees what the entry holds (tensors, mapping, files)
    users: int = 1  # requests of the same prompt sharing the entry


@dataclass
class PinLedger:
    budget_bytes: int
    max_pin_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    pins: dict[str, Pin] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.budget_bytes < 1:
            raise ValueError(f"the hand-off budget must be >= 1 byte, got {self.budget_bytes}")
        if self.max_pin_s <= 0:
            raise ValueError(f"max_pin_s must be > 0 seconds, got {self.max_pin_s}")

    @property
    def held_bytes(self) -> int:
        return sum(p.nbytes for p in self.pins.values())

    def admit(self, key: str, nbytes: int) -> str | None:
        """None if `nbytes` fits now (after dropping expired pins), else why not. Does not pin yet."""
        self.expire()
        with self._lock:
            held = sum(p.nbytes for k, p in self.pins.items() if k != key)
        if held + nbytes > self.budget_bytes:
            return (
                f"hand-off budget full: {nbytes} bytes asked, {held} of {self.budget_bytes} bytes pinned "
                f"by {len(self.pins)} entries not yet loaded"
            )
        return None

    def pin(self, key: str, nbytes: int, release: Callable[[], None]) -> None:
        """Hold a new entry (a key already held is `retain`ed instead, never replaced)."""
        with self._lock:
            old = self.pins.pop(key, None)
            self.pins[key] = Pin(nbytes, self.clock(), release)
        if old is not None:
            old.release()

    def retain(self, key: str) -> bool:
        """One more request of a prompt already held shares its entry; whether it was held."""
        with self._lock:
            pin = self.pins.get(key)
            if pin is not None:
                pin.users += 1
                pin.since = self.clock()
            return pin is not None

    def release(self, key: str, everyone: bool = False) -> bool:
        """A request of the entry finished (the last one frees it), or with `everyone` the consumer
        loaded it or it expired: free it now. Whether it was held."""
        with self._lock:
            pin = self.pins.get(key)
            if pin is None:
                return False
            pin.users -= 1
            if pin.users > 0 and not everyone:
                return True
            del self.pins[key]
        pin.release()
        return True

    def expire(self) -> list[str]:
        """Release entries pinned longer than `max_pin_s`; their keys."""
        now = self.clock()
        with self._lock:
            old = [k for k, p in self.pins.items() if now - p.since > self.max_pin_s]
        return [k for k in old if self.release(k, everyone=True)]

    def release_all(self) -> None:
        for key in list(self.pins):
            self.release(key, everyone=True)
