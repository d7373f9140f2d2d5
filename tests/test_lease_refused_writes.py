"""Redis refusing writes (out of memory) while a sidecar holds the compute-once lease (issue 26, item 14).

The holder computes the chunk but cannot store it in Redis. Before, it released the lease with no entry
and the waiters took it one after another, each computing again while the rest kept waiting (N sidecars:
N leases, N computes in a row). Now the holder leaves a short-lived "unstored" mark on the lease: every
waiter computes at once without competing for the lease again, each sidecar at most once, and the
refusals and the duplicates they cause are counted. Needs a Redis (skips without one)."""

from __future__ import annotations

import threading

import pytest
from storage_helpers import chunk, key, redis_url

from ragkv.storage import MemoryTier, RedisTier, TieredStore, TierWriteError
from ragkv.storage.lease import compute_once, leases_of
from ragkv.storage.redis_tier import RedisTier as _RedisTier

SIDECARS = 4


@pytest.fixture
def prefix(redis_prefix):
    return redis_prefix


@pytest.fixture
def refused_writes(monkeypatch):
    """Every entry write to Redis is refused as under `maxmemory` with noeviction (leases still work)."""

    def refuse(self, key, kv, cost=None, hits=0):
        raise TierWriteError(f"redis tier {self.name!r}: {key} not stored (OOM command not allowed)")

    monkeypatch.setattr(_RedisTier, "put", refuse)


def test_waiters_do_not_take_turns_recomputing_a_chunk_redis_refused(prefix, refused_writes):
    stores = [TieredStore([MemoryTier(1 << 20), RedisTier(redis_url(), 1 << 20, prefix=prefix)]) for _ in range(4)]
    leases = [leases_of(s) for s in stores]
    for lease in leases:
        lease.poll_s = 0.01
    started = threading.Barrier(SIDECARS)
    holder_computing = threading.Event()
    computed: list[int] = []
    lock = threading.Lock()

    def compute(chunks):
        with lock:
            computed.append(len(computed))
            first = len(computed) == 1
        if first:
            holder_computing.set()
            threading.Event().wait(0.3)  # the holder is slow: everyone else is waiting on its lease
        return [chunk(c[0]) for c in chunks]

    def sidecar(i: int) -> None:
        started.wait(10)
        if i:
            holder_computing.wait(10)  # the others start waiting once the holder has the lease
        compute_once(stores[i], {key(1): [1, 2]}, compute)

    threads = [threading.Thread(target=sidecar, args=(i,)) for i in range(SIDECARS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = [lease.stats for lease in leases]
    assert all(s.get_layered(key(1)) is not None for s in stores)  # every sidecar has the chunk locally
    assert len(computed) == SIDECARS  # each sidecar at most once: Redis could not share it
    assert sum(st.computed - st.unleased for st in stats) == 1  # only the holder computed under a lease
    assert sum(st.unstored for st in stats) == 1  # the holder's refused write, counted
    assert sum(st.refused_waits for st in stats) == SIDECARS - 1  # the waiters, told at once, computed
    assert (
        not leases[0].link.client.exists(leases[0].lease_key(key(1)))
        or leases[0].link.client.pttl(leases[0].lease_key(key(1))) <= leases[0].lease_ms
    )


def test_the_unstored_mark_expires_so_a_recovered_redis_is_used_again(prefix, refused_writes, monkeypatch):
    store = TieredStore([MemoryTier(1 << 20), RedisTier(redis_url(), 1 << 20, prefix=prefix)])
    lease = leases_of(store)
    lease.lease_ms = 200
    compute_once(store, {key(2): [2, 3]}, lambda cs: [chunk(c[0]) for c in cs])
    assert lease.stats.unstored == 1
    mark = lease.link.client.get(lease.lease_key(key(2)))
    assert mark == b"unstored" and 0 < lease.link.client.pttl(lease.lease_key(key(2))) <= 200
