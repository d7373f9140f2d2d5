"""Compute-once across sidecars (storage/lease.py): leases, waiting, orphaned leases, timeouts,
duplicates counted, Redis down -> compute locally. Needs a Redis (skips with the reason without one),
except the tests of the no-Redis paths."""

from __future__ import annotations

import threading
import time

import pytest
from storage_helpers import chunk, key, redis_url, same
from test_storage_redis import closed_port_url

from ragkv.storage import MemoryTier, RedisTier, TieredStore
from ragkv.storage.lease import ComputeLeases, compute_once, leases_of


@pytest.fixture
def prefix(redis_prefix):
    return redis_prefix


def _store(prefix: str, url: str | None = None) -> TieredStore:
    return TieredStore([MemoryTier(1 << 20), RedisTier(url or redis_url(), 1 << 20, "identity", prefix=prefix)])


class SlowCompute:
    """`compute(list of token ids)` -> chunks, taking `seconds`, recording what it computed."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls: list[list[int]] = []
        self._lock = threading.Lock()

    def __call__(self, chunks):
        time.sleep(self.seconds)
        with self._lock:
            self.calls.extend(c[0] for c in chunks)
        return [chunk(c[0]) for c in chunks]


def _missing(*ids: int) -> dict:
    return {key(i): [i, i + 1] for i in ids}


def test_two_sidecars_missing_the_same_chunks_compute_each_once(prefix):
    stores = [_store(prefix), _store(prefix)]
    compute = SlowCompute(0.3)
    results: list = [None, None]

    def sidecar(i: int) -> None:
        results[i] = compute_once(stores[i], _missing(1, 2, 3), compute)

    threads = [threading.Thread(target=sidecar, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(compute.calls) == [1, 2, 3]  # each chunk computed once in all
    assert sorted(len(r) for r in results) == [0, 3]  # the loser found all three computed by the winner
    assert all(same(s.get_layered(key(i)), chunk(i)) for s in stores for i in (1, 2, 3))
    stats = [leases_of(s).stats for s in stores]
    assert sum(st.computed for st in stats) == 3 and sum(st.arrived for st in stats) == 3
    assert sum(st.duplicates for st in stats) == 0 and sum(st.timeouts for st in stats) == 0


def test_a_lease_whose_holder_died_is_taken_over_when_it_expires(prefix):
    store = _store(prefix)
    leases = leases_of(store)
    leases.link.client.set(leases.lease_key(key(1)), "dead-sidecar", px=200)
    compute = SlowCompute()
    t0 = time.monotonic()
    assert compute_once(store, _missing(1), compute) == {}
    assert compute.calls == [1] and 0.15 < time.monotonic() - t0 < 5.0
    assert leases.stats.timeouts == 0 and leases.stats.computed == 1
    assert not leases.link.client.exists(leases.lease_key(key(1)))  # released after computing


def test_a_wait_that_runs_out_computes_anyway_and_counts_the_duplicate(prefix):
    store = _store(prefix)
    leases = leases_of(store)
    leases.wait_s = 0.2
    r = leases.link.client
    r.set(leases.lease_key(key(1)), "slow-sidecar", px=60_000)
    r.set(leases.count_key(key(1)), 1)  # the slow sidecar's precompute was counted already
    compute_once(store, _missing(1), SlowCompute())
    assert leases.stats.timeouts == 1 and leases.stats.duplicates == 1 and leases.stats.computed == 1
    assert r.get(leases.lease_key(key(1))) == b"slow-sidecar"  # someone else's lease is left alone


def test_a_chunk_that_landed_before_the_lease_is_not_recomputed(prefix):
    writer, late = _store(prefix), _store(prefix)
    writer.put(key(1), chunk(1))
    compute = SlowCompute()
    assert compute_once(late, _missing(1), compute) == {key(1): "redis"} and compute.calls == []


def test_unreachable_redis_computes_locally_without_a_lease():
    store = _store("ragkv-lease-down", closed_port_url())
    compute = SlowCompute()
    assert compute_once(store, _missing(1, 2), compute) == {}
    assert sorted(compute.calls) == [1, 2] and leases_of(store).stats.unleased == 2
    assert same(store.get_layered(key(1)), chunk(1))  # served from the local tier


def test_without_a_redis_tier_every_missing_chunk_is_computed_and_stored():
    store = TieredStore([MemoryTier(1 << 20)])
    compute = SlowCompute()
    assert compute_once(store, _missing(1, 2), compute) == {} and leases_of(store) is None
    assert sorted(compute.calls) == [1, 2] and store.lookup([key(1), key(2)]) == ["cpu", "cpu"]


def test_lease_settings_are_validated(prefix):
    with pytest.raises(ValueError, match="lease_ms and poll_s must be > 0"):
        ComputeLeases(RedisTier(redis_url(), prefix=prefix), lease_ms=0)


@pytest.mark.parametrize("tiny_adapter", ["llama"], indirect=True)
def test_engines_sharing_redis_reuse_each_others_chunks(prefix, tiny_adapter):
    from ragkv.engine import Engine

    a, b = Engine(tiny_adapter, _store(prefix)), Engine(tiny_adapter, _store(prefix))
    chunks = [[5, 6, 7, 8], [9, 10, 11]]
    _, hits_a, misses_a = a.ensure_cached(chunks)
    _, hits_b, misses_b = b.ensure_cached(chunks)
    assert (hits_a, misses_a) == ({}, 2) and (hits_b, misses_b) == ({"redis": 2}, 0)


def test_a_precompute_slower_than_the_lease_keeps_it(prefix):
    stores = [_store(prefix), _store(prefix)]
    for s in stores:
        leases_of(s).lease_ms = 300  # renewed every 100 ms while computing
    compute = SlowCompute(1.0)  # > 3 lease lifetimes
    first = threading.Thread(target=compute_once, args=(stores[0], _missing(1), compute))
    first.start()
    time.sleep(0.2)
    assert compute_once(stores[1], _missing(1), compute) == {key(1): "redis"}  # waited, did not take over
    first.join()
    assert compute.calls == [1] and leases_of(stores[1]).stats.computed == 0
