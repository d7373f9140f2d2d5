"""Compute each chunk once, cluster-wide: a short Redis lease per missing chunk before precomputing it.

`compute_once(store, missing, compute)` is the Engine's miss path. Without a Redis tier in the store it
computes every missing chunk and stores it (what one process always did). With one, for each missing
chunk it takes a lease (`SET {slot}:lease token NX PX lease_ms`, under the chunk's hash tag):

- lease won: check the entry did not land meanwhile, compute (all won chunks in one batch; a thread
  extends the leases every lease_ms / 3 while it runs), store (the store writes it through to
  Redis), then release the lease (compare-and-delete);
- lease held by another sidecar: wait, polling the entry's header, until it lands (a hit: nothing
  computed here), or the lease vanishes without an entry (its holder died: try to take it), or
  `wait_s` passes (compute anyway: counted as a timeout).

Every precompute increments `{slot}:n` in Redis (deleted with the entry, so a recompute after Redis
evicted or dropped it is not a duplicate); a count above one is a duplicate. Redis unreachable: no
lease, compute locally (`unleased` counts it), the answer is served all the same. Before giving up on
the lease, the first try probes Redis even within the link's backoff (`RedisLink.call(eager=True)`): a
sidecar whose link is still backing off after Redis came back would otherwise recompute chunks Redis
holds. A chunk computed without a lease whose count, once Redis answers again, is above one is an
`outage_duplicates` (Redis was unreachable when it was decided, so no protocol could have avoided
it); `duplicates` counts only computes decided with Redis reachable (under a lease, or after a wait
ran out): the compute-once protocol's own failures. Each is logged with its key.

Redis refusing the entry (out of memory) while the lease is held: the holder serves its answer from its
local tiers (`unstored` counts it) and, instead of releasing the lease, marks it `unstored` for lease_ms.
A waiter that sees the mark computes at once without a lease (`refused_waits`), and so does a sidecar
that finds the mark when it asks for the lease: each sidecar computes such a chunk at most once, all at
the same time, instead of taking the lease in turn, each computing again while the rest wait. When the
mark expires, the next miss tries Redis again. (A mark Redis refuses too is a plain release.)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from ..chunk_cache import ChunkKey, ChunkKV
from .redis_tier import RedisTier

log = logging.getLogger(__name__)

# delete the lease only if it is still ours (it may have expired and been taken by another sidecar)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# turn our lease into the `unstored` mark (the entry could not be written): waiters stop waiting on it
_MARK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) else return 0 end"
)
UNSTORED = b"unstored"
# extend the lease only if it is still ours
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)


@dataclass
class LeaseStats:
    """What the compute-once protocol did in this process."""

    computed: int = 0  # chunks precomputed here
    arrived: int = 0  # chunks another sidecar computed while we waited (hits, nothing computed here)
    timeouts: int = 0  # waits that ran out: computed anyway
    duplicates: int = 0  # precomputes of a chunk Redis had already counted once (by any sidecar)
    unleased: int = 0  # chunks computed without a lease because Redis was unreachable (or refused the entry)
    outage_duplicates: int = 0  # of the unleased ones: chunks Redis had counted once already
    unstored: int = 0  # chunks computed under a lease whose Redis write was refused (out of memory)
    refused_waits: int = 0  # waits ended by an `unstored` mark: computed here at once, without a lease

    def to_dict(self) -> dict:
        return asdict(self)


class ChunkSink(Protocol):
    """What the protocol needs from the store: somewhere to put what it computed (a TieredStore)."""

    def put(self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, *, write_behind: bool = False) -> object: ...


class ComputeLeases:
    """Leases and precompute counters for the entries of one Redis tier."""

    def __init__(self, tier: RedisTier, lease_ms: int = 30_000, wait_s: float = 30.0, poll_s: float = 0.02) -> None:
        if lease_ms <= 0 or wait_s < 0 or poll_s <= 0:
            raise ValueError(f"lease_ms and poll_s must be > 0 and wait_s >= 0; got {lease_ms}, {wait_s}, {poll_s}")
        self.tier = tier
        self.link = tier.link
        self.lease_ms = lease_ms
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.stats = LeaseStats()
        self._lock = threading.Lock()

    def lease_key(self, key: ChunkKey) -> str:
        return self.tier.slot(key) + ":lease"

    def count_key(self, key: ChunkKey) -> str:
        return self.tier.count_key(key)

    # -- the protocol ---------------------------------------------------------------------------------
    def run(
        self,
        store: ChunkSink,
        missing: Mapping[ChunkKey, Sequence[int]],
        compute: Callable[[list[Sequence[int]]], list[ChunkKV]],
        write_behind: bool = False,
    ) -> set[ChunkKey]:
        """Make every key of `missing` present in the store; returns the keys another sidecar computed."""
        token = uuid.uuid4().hex
        pending = list(missing)
        arrived: set[ChunkKey] = set()
        deadline = time.monotonic() + self.wait_s
        eager = True  # the first try probes a link that is backing off
        while pending:
            won = self._acquire(pending, token, eager)
            eager = False
            if won is None:  # Redis unreachable: no coordination, compute here
                self._compute(store, pending, missing, compute, None, write_behind, leased=False)
                break
            mine = [k for k, w in zip(pending, won) if w]
            if mine:
                landed = self._present(mine)
                arrived.update(k for k, p in zip(mine, landed) if p)
                todo = [k for k, p in zip(mine, landed) if not p]
                renew = self._keep_alive(mine, token)  # a slow precompute must not lose its leases
                unstored: list[ChunkKey] = []
                try:
                    self._compute(store, todo, missing, compute, token, write_behind)
                    unstored = [k for k in todo if not self.tier.lookup(k)]  # Redis refused the write
                finally:
                    renew.set()
                    self._release([k for k in mine if k not in unstored], token)
                    self._mark_unstored(unstored, token)
            pending = [k for k, w in zip(pending, won) if not w]
            if not pending:
                break
            pending, refused = self._wait(pending, deadline, arrived)
            if refused:  # the holder could not store them: compute here now, everyone at once
                self._count(refused_waits=len(refused))
                self._compute(store, refused, missing, compute, None, write_behind, leased=False)
            if pending and time.monotonic() >= deadline:  # waited long enough: compute anyway
                self._count(timeouts=len(pending))
                self._compute(store, pending, missing, compute, None, write_behind)
                break
        self._count(arrived=len(arrived))
        return arrived

    # -- internals ----------------------------------------------------------------------------------
    def _acquire(self, keys: list[ChunkKey], token: str, eager: bool = False) -> list[bool] | None:
        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.set(self.lease_key(k), token, nx=True, px=self.lease_ms)
            return [bool(x) for x in pipe.execute()]

        return self.link.call(go, None, eager=eager)

    def _present(self, keys: list[ChunkKey]) -> list[bool]:
        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self.tier.header_key(k))
            return [bool(x) for x in pipe.execute()]

        return self.link.call(go, [False] * len(keys))

    def _wait(
        self, keys: list[ChunkKey], deadline: float, arrived: set[ChunkKey]
    ) -> tuple[list[ChunkKey], list[ChunkKey]]:
        """Poll until each key's entry lands (-> `arrived`), its lease is gone or marked `unstored`;
        returns (keys still missing: lease gone without an entry, the deadline passed or Redis went
        away; keys whose lease is marked `unstored`: Redis refused the holder's entry)."""
        waiting = list(keys)
        first = True
        while waiting and time.monotonic() < deadline:
            if not first:  # a mark is there at once for a key whose lease could not be taken
                time.sleep(self.poll_s)
            first = False

            def go(r, keys=tuple(waiting)):
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.exists(self.tier.header_key(k))
                    pipe.get(self.lease_key(k))
                out = pipe.execute()
                return list(zip(out[::2], out[1::2]))

            states = self.link.call(go, None)
            if states is None:
                return waiting, []  # Redis went away: the caller computes
            still, orphaned, refused = [], [], []
            for k, (entry, lease) in zip(waiting, states):
                if entry:
                    arrived.add(k)
                elif lease == UNSTORED:
                    refused.append(k)
                elif lease:
                    still.append(k)
                else:
                    orphaned.append(k)
            if orphaned or refused:
                return orphaned + still, refused  # retry leases for the orphans (and keep waiting on the rest)
            waiting = still
        return waiting, []

    def _compute(
        self,
        store: ChunkSink,
        keys: list[ChunkKey],
        missing: Mapping[ChunkKey, Sequence[int]],
        compute: Callable[[list[Sequence[int]]], list[ChunkKV]],
        token: str | None,
        write_behind: bool = False,
        leased: bool = True,
    ) -> None:
        """Compute and store `keys`; `leased=False`: decided while Redis was unreachable."""
        if not keys:
            return
        for k, kv in zip(keys, compute([missing[k] for k in keys])):
            store.put(k, kv, cost=kv.num_tokens, write_behind=write_behind)
        counts = self._note_computed(keys)
        again = [(k, c) for k, c in zip(keys, counts) if c > 1]
        for k, c in again:
            why = "with Redis reachable" if leased else "without a lease while Redis was unreachable"
            log.warning("chunk %s precomputed again (%d times in all), decided %s", k, c, why)
        if leased:
            self._count(computed=len(keys), duplicates=len(again))
        else:
            self._count(computed=len(keys), unleased=len(keys), outage_duplicates=len(again))

    def _note_computed(self, keys: list[ChunkKey]) -> list[int]:
        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.incr(self.count_key(k))
                if self.tier.ttl_ms is not None:
                    pipe.pexpire(self.count_key(k), self.tier.ttl_ms)
            out = pipe.execute()
            return out[:: 2 if self.tier.ttl_ms is not None else 1]

        return self.link.call(go, [1] * len(keys))

    def _keep_alive(self, keys: list[ChunkKey], token: str) -> threading.Event:
        """Extend our leases on `keys` every lease_ms / 3 until the returned event is set."""
        stop = threading.Event()

        def renew(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.eval(_RENEW, 1, self.lease_key(k), token, self.lease_ms)
            pipe.execute()

        def loop() -> None:
            while not stop.wait(self.lease_ms / 3000):
                self.link.call(renew, None)

        threading.Thread(target=loop, name="ragkv-lease-renew", daemon=True).start()
        return stop

    def _release(self, keys: list[ChunkKey], token: str) -> None:
        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.eval(_RELEASE, 1, self.lease_key(k), token)
            pipe.execute()

        self.link.call(go, None)

    def _mark_unstored(self, keys: list[ChunkKey], token: str) -> None:
        """Our leases on `keys`, whose entries Redis refused, become the `unstored` mark for lease_ms."""
        if not keys:
            return
        self._count(unstored=len(keys))
        log.warning(
            "redis tier %r refused %d computed chunks (%s): marked unstored", self.tier.name, len(keys), keys[0]
        )

        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.eval(_MARK, 1, self.lease_key(k), token, UNSTORED, self.lease_ms)
            pipe.execute()
            return True

        if not self.link.call(go, False):  # the mark refused too: a plain release (waiters take turns)
            self._release(keys, token)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)


def leases_of(store) -> ComputeLeases | None:
    """The compute leases of the store's first Redis tier (`store.services.leases`), or None without one."""
    return store.services.leases


def compute_once(
    store,
    missing: Mapping[ChunkKey, Sequence[int]],
    compute: Callable[[list[Sequence[int]]], list[ChunkKV]],
    write_behind: bool = False,
) -> dict[ChunkKey, str]:
    """Precompute (`compute(list of token ids) -> ChunkKVs`) and store the `missing` chunks, each once
    across every sidecar sharing the store's Redis tier; returns {key: Redis tier name} for the keys
    another sidecar computed meanwhile (hits for the caller). `write_behind` is passed to `store.put`.
    `store` is a TieredStore: its services hold the leases (`store.services.leases`)."""
    if not missing:
        return {}
    leases = leases_of(store)
    if leases is None:
        for k, kv in zip(missing, compute(list(missing.values()))):
            store.put(k, kv, cost=kv.num_tokens, write_behind=write_behind)
        return {}
    return dict.fromkeys(leases.run(store, missing, compute, write_behind), leases.tier.name)
