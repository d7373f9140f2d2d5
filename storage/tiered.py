"""TieredStore: the policy over an ordered list of tiers (fastest first) that the Engine reads through.

`lookup` says where each key lives without I/O; `get_layered` reads from the fastest tier holding it
(lazily, layer by layer) and promotes a lower-tier hit to the first tier (after the request, when
the key is pinned); `put` stores in the first tier (with `write_behind`, a background thread also
copies it to the last tier, the disk, so it outlives the process); a tier over budget evicts by its policy and
demotes the victim to the next tier. Pinned keys are never evicted. Copies are inclusive: a promoted
entry keeps its lower copy, so demoting it again costs no write. `services` (storage/services.py)
holds what the store offers besides entries: chunk metadata, compute leases, remote tiers' health.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import CodecError, DecodePool
from .layered import materialize
from .policy import make_policy
from .services import StoreServices
from .stats import StoreStats, TierStats
from .tier import Tier, TierWriteError

log = logging.getLogger(__name__)


class TieredStore:
    """Ordered tiers, fastest first, with one eviction policy (`lru` or `cost`) per tier."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        policy: str = "lru",
        promote: bool = True,
        read_threads: int | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.policy = policy
        self.policies = [make_policy(policy) for _ in self.tiers]
        self.promote = promote
        infos = [t.infos() for t in self.tiers]
        for p, tier_infos in zip(self.policies, infos):
            p.restore(tier_infos)
        self._clock = 1 + max((i.last_access for ti in infos for i in ti), default=0)
        self._lock = threading.RLock()
        self._pins: Counter[ChunkKey] = Counter()
        self._pending: dict[ChunkKey, int] = {}  # deferred promotions: key -> tier index of the hit
        self._hits = Counter({n: 0 for n in names})
        self._evictions = Counter({n: 0 for n in names})
        self._count = Counter()
        self._last_error: str | None = None
        # file reads and checksums (SHA-256, CRC32) release the GIL: one thread per core, 4 to 16
        self.read_threads = read_threads or max(4, min(16, os.cpu_count() or 4))
        self._pool: ThreadPoolExecutor | None = None
        self.decode_pool = decode_pool  # the tiers' worker processes, if any: the store closes them
        self._behind: dict[ChunkKey, tuple[ChunkKV, float | None]] = {}  # waiting for the write-behind thread
        self._behind_queue: queue.Queue[ChunkKey | None] = queue.Queue()
        self._behind_thread: threading.Thread | None = None
        self.services = StoreServices(self.tiers)  # chunk metadata, compute leases, remote health

    # -- the read path: lookup -> pin -> get_layered (per layer) -> unpin ---------------------------
    def lookup(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """For each key, the name of the fastest tier holding it, or None; no I/O, no side effects."""
        return [next((t.name for t in self.tiers if t.lookup(k)), None) for k in keys]

    def note_misses(self, n: int) -> None:
        """Count `n` misses a caller found through `lookup` (and computed itself), so `stats().misses`
        agrees with what the caller reports."""
        with self._lock:
            self._count["misses"] += n

    def get_layered(self, key: ChunkKey, device: torch.device | str | None = None) -> LayeredKV | None:
        """The entry from the fastest tier holding it, decoded layer by layer on `device`; None on a miss.

        A corrupt entry is dropped by its tier and the next tier is tried; a hit below the first tier
        is promoted now, or when the key is unpinned if a request holds it.
        """
        for i, tier in enumerate(self.tiers):
            if not tier.lookup(key):
                continue
            kv = tier.get(key, device)  # I/O and checksum outside the store lock
            if kv is None:
                continue
            with self._lock:
                self._hits[tier.name] += 1
                info = tier.info(key)
                if info is not None:
                    self.policies[i].on_hit(info, self._tick())
                    tier.touched(key)
                if i > 0 and self.promote:
                    if self._pins[key]:
                        self._pending[key] = i
                    elif not self._promote(key, i, kv):  # damaged (read layer by layer): dropped by its tier
                        self._hits[tier.name] -= 1
                        self._count["misses"] += 1
                        return None
            return kv
        with self._lock:
            self._count["misses"] += 1
        return None

    def get_layered_many(
        self, keys: Sequence[ChunkKey], device: torch.device | str | None = None
    ) -> list[LayeredKV | None]:
        """`get_layered` for several keys, read and verified in parallel threads (file reads and
        checksums release the GIL), in the order of `keys`."""
        if len(keys) <= 1:
            return [self.get_layered(k, device) for k in keys]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="ragkv-store-read")
        return list(self._pool.map(lambda k: self.get_layered(k, device), keys))

    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> ChunkKV | None:
        """The whole entry as one ChunkKV (all layers decoded), or None on a miss."""
        kv = self.get_layered(key, device)
        try:
            return None if kv is None else materialize(kv, device)
        except CodecError:  # a layer failed its check on reading: its tier dropped the entry, a miss
            return None

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        """Keep `keys` from being evicted until as many `unpin` calls."""
        with self._lock:
            self._pins.update(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        """Release pins; runs promotions deferred while a key was pinned."""
        with self._lock:
            for key in keys:
                assert self._pins[key] > 0, f"unpin of {key}, which is not pinned"
                self._pins[key] -= 1
                if self._pins[key] == 0:
                    del self._pins[key]
                    i = self._pending.pop(key, None)
                    if i is not None and self.tiers[i].lookup(key) and not self.tiers[0].lookup(key):
                        kv = self.tiers[i].get(key, self.tiers[0].device)
                        if kv is not None:
                            self._promote(key, i, kv)

    @contextmanager
    def pinned(self, keys: Iterable[ChunkKey]) -> Iterator[TieredStore]:
        """`with store.pinned(keys):` the entries of `keys` stay put while a request uses them."""
        keys = list(keys)
        self.pin(keys)
        try:
            yield self
        finally:
            self.unpin(keys)

    # -- the write path ------------------------------------------------------------------------------
    def put(
        self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, durable: bool = False, write_behind: bool = False
    ) -> str | None:
        """Store in the first tier that accepts it (recompute `cost` defaults to the token count);
        `durable` also writes a copy to the last tier (the disk, when there is one) so it outlives
        the process; a `shared` tier (Redis) below the one it landed in always gets a copy;
        `write_behind` queues the copy to the last tier for a background thread instead, off the
        caller's path (`flush` and `close` wait for it). Returns the tier now holding it, or None if
        no tier could (errors are logged)."""
        with self._lock:
            self._count["puts"] += 1
            landed = next((i for i in range(len(self.tiers)) if self._insert(i, key, kv, cost, 0)), None)
            for j, tier in enumerate(self.tiers):
                if tier.shared and landed is not None and j > landed:  # other sidecars read it: write through
                    self._insert(j, key, kv, cost, 0)
            last = len(self.tiers) - 1
            if (durable or write_behind) and landed is not None and landed < last and not self.tiers[last].lookup(key):
                if durable:
                    self._insert(last, key, kv, cost, 0)
                elif key not in self._behind:
                    self._behind[key] = (kv, cost)
                    self._start_writer()
                    self._behind_queue.put(key)
            return self.lookup([key])[0]

    def _start_writer(self) -> None:
        if self._behind_thread is None:
            self._behind_thread = threading.Thread(target=self._write_behind, name="ragkv-write-behind", daemon=True)
            self._behind_thread.start()

    def _write_behind(self) -> None:
        """The write-behind thread: copy queued entries to the last tier, one at a time."""
        last = len(self.tiers) - 1
        while (key := self._behind_queue.get()) is not None:
            try:
                with self._lock:
                    item = self._behind.pop(key, None)  # None: removed since it was queued
                    if item is not None and not self.tiers[last].lookup(key):
                        self._insert(last, key, item[0], item[1], 0)
            except Exception as err:  # a failed copy costs a recompute later; the thread goes on
                log.warning("write-behind of %s failed: %s", key, err)
            finally:
                self._behind_queue.task_done()
        self._behind_queue.task_done()

    def wait_written(self) -> None:
        """Block until every queued write-behind copy is in the last tier."""
        if self._behind_thread is not None:
            self._behind_queue.join()

    def remove(self, key: ChunkKey) -> bool:
        """Drop `key` from every tier; True if any held it."""
        with self._lock:
            self._pending.pop(key, None)
            self._behind.pop(key, None)
            return any([t.remove(key) for t in self.tiers])

    # -- stats and lifecycle ------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._lock:
            tiers = [
                TierStats(
                    t.name,
                    t.codec.name,
                    len(t),
                    t.nbytes,
                    t.capacity_bytes,
                    self._hits[t.name],
                    self._evictions[t.name],
                    t.corrupt,
                )
                for t in self.tiers
            ]
            c = self._count
            return StoreStats(
                tiers,
                misses=c["misses"],
                puts=c["puts"],
                promotions=c["promotions"],
                demotions=c["demotions"],
                dropped=c["dropped"],
                write_errors=c["write_errors"],
                last_error=self._last_error,
            )

    def flush(self) -> None:
        """Finish the write-behind copies, then persist bookkeeping of persistent tiers."""
        self.wait_written()
        with self._lock:
            for t in self.tiers:
                t.flush()

    def close(self) -> None:
        self.wait_written()
        if self._behind_thread is not None:
            self._behind_queue.put(None)
            self._behind_thread.join()
            self._behind_thread = None
        if self._pool is not None:
            self._pool.shutdown()
        if self.decode_pool is not None:
            self.decode_pool.close()
        with self._lock:
            self.services.close()
            for t in self.tiers:
                t.close()

    # -- internals (called with the lock held) ------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _insert(self, i: int, key: ChunkKey, kv: ChunkKV, cost: float | None, hits: int) -> bool:
        """Put into tier i and fit it to its budget; True if the entry is in tier i or below after."""
        tier = self.tiers[i]
        try:
            info = tier.put(key, kv, cost, hits)
        except TierWriteError as err:
            log.warning("%s", err)
            self._count["write_errors"] += 1
            self._last_error = str(err)
            return False
        self.policies[i].on_insert(info, self._tick())
        tier.touched(key)
        self._fit(i)
        return True

    def _fit(self, i: int) -> None:
        tier = self.tiers[i]
        while tier.nbytes > tier.capacity_bytes:
            victim = self.policies[i].victim(tier.infos(), exclude=set(self._pins))
            if victim is None:
                log.warning(
                    "tier %r over budget (%d > %d bytes): every entry is pinned",
                    tier.name,
                    tier.nbytes,
                    tier.capacity_bytes,
                )
                return
            self._evict(i, victim.key)

    def _evict(self, i: int, key: ChunkKey) -> None:
        """Move `key` out of tier i: demoted to tier i+1 (unless already there), dropped from the last."""
        tier = self.tiers[i]
        below = self.tiers[i + 1] if i + 1 < len(self.tiers) else None
        info = tier.info(key)
        kv = tier.get(key, below.device) if below is not None and not below.lookup(key) else None
        try:
            chunk = materialize(kv) if kv is not None else None
        except CodecError:  # a damaged entry (its tier dropped it on reading): nothing to demote
            chunk = None
        tier.remove(key)
        if info is not None:
            self.policies[i].on_evict(info)
        self._evictions[tier.name] += 1
        if below is None:
            self._count["dropped"] += 1
        elif below.lookup(key):
            self._count["demotions"] += 1
        elif chunk is not None and self._insert(
            i + 1, key, chunk, info.cost if info else None, info.hits if info else 0
        ):
            self._count["demotions"] += 1

    def _promote(self, key: ChunkKey, i: int, kv: LayeredKV) -> bool:
        """Copy a lower-tier hit into the first tier; False when the entry turned out damaged on reading."""
        info = self.tiers[i].info(key)
        try:
            chunk = materialize(kv, self.tiers[0].device)
        except CodecError as err:  # a layer failed its check on reading: its tier dropped the entry
            log.warning("not promoting %s: %s", key, err)
            return False
        if self._insert(0, key, chunk, info.cost if info else None, info.hits if info else 0):
            self._count["promotions"] += 1
        return True
