"""Chunks precomputed twice across sidecars (issue #17): the races the multi-sidecar run hit, each made
deterministic with two Engines (tiny Llama) whose stores share one Redis prefix, and counted.

- an entry that vanished between lookup and read (Redis evicted a part) in two sidecars at once was
  recomputed by both outside the compute-once lease; now one computes, the other waits for it;
- a sidecar whose Redis link was still backing off after an outage recomputed a chunk Redis held
  (and counted a duplicate when its counter landed); now it probes Redis before computing.
Needs a Redis (skips with the reason without one)."""

from __future__ import annotations

import threading
import time

import pytest
from storage_helpers import redis_url
from tiny_engine import PASSAGES, tiny_engine

import ragkv.engine.chunk_supply as supply_module
from ragkv.storage import MemoryTier, RedisTier, TieredStore
from ragkv.storage.lease import leases_of

QUESTION = "Where does the river bend?"


def _engine(prefix: str):
    return tiny_engine(TieredStore([MemoryTier(), RedisTier(redis_url(), 1 << 30, "identity", prefix=prefix)]))


@pytest.fixture
def counted_precompute(monkeypatch):
    """Every chunk the Engine precomputes (token ids), each pass slowed so racing sidecars overlap."""
    real = supply_module.precompute_many
    computed: list[tuple[int, ...]] = []
    lock = threading.Lock()

    def slow(model, chunks, *args):
        time.sleep(0.3)
        with lock:
            computed.extend(tuple(c) for c in chunks)
        return real(model, chunks, *args)

    monkeypatch.setattr(supply_module, "precompute_many", slow)
    return computed


def _duplicates(*engines) -> int:
    stats = [leases_of(e.store).stats for e in engines]
    return sum(s.duplicates + s.outage_duplicates for s in stats)


def test_an_entry_two_sidecars_lose_at_once_is_recomputed_once(redis_prefix, counted_precompute):
    writer, a, b = _engine(redis_prefix), _engine(redis_prefix), _engine(redis_prefix)
    writer.run(QUESTION, PASSAGES, strategy="naive")  # all three chunks in Redis
    lost = writer.ensure_cached(writer.tokenize_chunks(PASSAGES))[0][1]
    redis = writer.store.tiers[1]
    counted_precompute.clear()
    gate = threading.Barrier(2)

    def read_after_the_eviction(store):
        real = store.get_layered_many

        def read(keys, device=None):
            if gate.wait() == 0:  # both sidecars have looked up (a Redis hit each); now Redis evicts a part
                redis.link.client.delete(redis.part_key(lost, 0))
            gate.wait()
            return real(keys, device)

        store.get_layered_many = read

    for e in (a, b):
        read_after_the_eviction(e.store)
    runs: dict = {}
    threads = [threading.Thread(target=lambda e=e: runs.setdefault(e, e.run(QUESTION, PASSAGES))) for e in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counted_precompute) == 1  # before the fix: 2 (each sidecar recomputed it, outside the lease)
    assert sorted(r.misses for r in runs.values()) == [0, 1]  # the other one waited for it: a hit
    assert all(r.hits == {"redis": len(PASSAGES)} for r in runs.values())
    assert _duplicates(writer, a, b) == 0  # the count went with the evicted entry: a recompute, not a duplicate
    assert redis.link.client.get(leases_of(a.store).count_key(lost)) == b"1"


def test_a_sidecar_whose_link_is_still_backing_off_finds_the_chunk_instead_of_recomputing(
    redis_prefix, counted_precompute
):
    a, b = _engine(redis_prefix), _engine(redis_prefix)
    a.run(QUESTION, PASSAGES, strategy="naive")  # computed once, counted once
    link = b.store.tiers[1].link
    link._down(ConnectionError("Redis restarted"))  # B saw the outage; Redis is back, B's backoff is not over
    link._retry_at = time.monotonic() + 60
    counted_precompute.clear()
    run = b.run(QUESTION, PASSAGES, strategy="naive")
    # lookup still answers from the backoff (a miss each), but before computing B probes Redis, takes the
    # leases and finds every entry there: nothing computed (before the fix: 3 unleased computes, 3 duplicates)
    assert counted_precompute == [] and run.misses == 0 and run.hits == {"redis": len(PASSAGES)}
    stats = leases_of(b.store).stats
    assert stats.arrived == len(PASSAGES) and stats.unleased == 0 and _duplicates(a, b) == 0
    assert link.up and link.outages == 1


def test_a_chunk_computed_while_redis_was_unreachable_is_counted_as_an_outage_duplicate(redis_prefix, monkeypatch):
    a, b = _engine(redis_prefix), _engine(redis_prefix)
    a.run(QUESTION, PASSAGES[:1], strategy="naive")
    leases, link = leases_of(b.store), b.store.tiers[1].link
    link._down(ConnectionError("Redis unreachable"))  # B's lookup misses and its lease cannot be taken ...
    link._retry_at = time.monotonic() + 60
    monkeypatch.setattr(leases, "_acquire", lambda *args, **kw: None)
    real = supply_module.precompute_many

    def redis_back_meanwhile(model, chunks, *args):
        out = real(model, chunks, *args)
        link._retry_at = 0.0  # ... and Redis answers again once the compute is done: the count lands
        return out

    monkeypatch.setattr(supply_module, "precompute_many", redis_back_meanwhile)
    run = b.run(QUESTION, PASSAGES[:1], strategy="naive")
    assert run.misses == 1
    assert leases.stats.unleased == 1 and leases.stats.outage_duplicates == 1 and leases.stats.duplicates == 0
