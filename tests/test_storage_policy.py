"""TieredStore policy: exact LRU and cost-aware (GDSF) eviction order, promotion/demotion, pinning, config."""

from __future__ import annotations

import pytest
import torch
from storage_helpers import chunk, key, same

from ragkv.storage import (
    DiskTier,
    MemoryTier,
    StorageConfig,
    TierConfig,
    TieredStore,
    build_store,
    make_policy,
)

ENTRY = chunk(0).nbytes  # bytes of one tiny entry in an identity memory tier


def _store(policy: str = "lru", slots: int = 3, below: bool = False, tmp_path=None) -> TieredStore:
    tiers = [MemoryTier(slots * ENTRY, name="cpu")]
    if below:
        tiers.append(DiskTier(tmp_path / "disk", 1 << 20))
    return TieredStore(tiers, policy=policy)


def _held(store: TieredStore, n: int) -> list[str | None]:
    return store.lookup([key(i) for i in range(n)])


def test_lru_evicts_least_recently_used_in_order():
    store = _store("lru")
    for i in range(3):
        store.put(key(i), chunk(i))
    store.get_layered(key(0))  # 0 is now the most recent; 1 the least
    store.put(key(3), chunk(3))
    assert _held(store, 4) == ["cpu", None, "cpu", "cpu"]
    store.put(key(4), chunk(4))
    assert _held(store, 5) == ["cpu", None, None, "cpu", "cpu"]
    store.get_layered(key(3))
    store.put(key(5), chunk(5))  # order now: 0 (oldest), 4, 3 -> evict 0
    assert _held(store, 6) == [None, None, None, "cpu", "cpu", "cpu"]
    assert store.stats().tiers[0].evictions == 3 and store.stats().dropped == 3


def test_cost_aware_keeps_most_recompute_per_byte():
    store = _store("cost")
    for i, cost in enumerate([1.0, 10.0, 5.0]):
        store.put(key(i), chunk(i), cost=cost)
    store.put(key(3), chunk(3), cost=3.0)  # H: 1, 10, 5, 3 (/bytes) -> evict 0; L = 1/bytes
    assert _held(store, 4) == [None, "cpu", "cpu", "cpu"]
    store.put(key(4), chunk(4), cost=2.0)  # H(4) = L + 2 = 3 ties H(3) = 3: older (3) goes first
    assert _held(store, 5) == [None, "cpu", "cpu", None, "cpu"]
    for _ in range(3):
        store.get_layered(key(4))  # frequency: H(4) = L + 4 hits x 2 = 11 (/bytes)
    store.put(key(5), chunk(5), cost=6.0)  # L = 3 -> H(5) = 9; candidates 10, 5, 11, 9 -> evict 2
    assert _held(store, 6) == [None, "cpu", None, None, "cpu", "cpu"]


def test_cost_defaults_to_tokens_per_byte():
    store = _store("cost", slots=2)
    wide = chunk(0)  # 8 tokens x 2 heads x 16 dims
    dense = (2, 3, 8, 1, 16)  # 8 tokens in half the bytes: twice the recompute per byte
    store.put(key(0), wide)
    store.put(key(1), chunk(1, shape=dense))
    store.put(key(2), chunk(2, shape=dense))
    store.put(key(3), chunk(3, shape=dense))  # over budget: the wide one saves least per byte
    assert _held(store, 4) == [None, "cpu", "cpu", "cpu"]


def test_demotion_then_promotion_on_hit(tmp_path):
    store = _store("lru", slots=2, below=True, tmp_path=tmp_path)
    for i in range(3):
        store.put(key(i), chunk(i))
    assert _held(store, 3) == ["disk", "cpu", "cpu"]  # 0 was evicted and demoted
    assert same(store.get_layered(key(0)), chunk(0))  # hit on disk -> promoted, 1 demoted
    assert _held(store, 3) == ["cpu", "disk", "cpu"]
    s = store.stats()
    assert s.demotions == 2 and s.promotions == 1 and s.hits == {"cpu": 0, "disk": 1} and s.dropped == 0
    # inclusive: 0 keeps its disk copy, so demoting it again writes nothing new
    assert store.tiers[1].lookup(key(0)) and len(store.tiers[1]) == 2


def test_promotion_waits_for_unpin(tmp_path):
    store = _store("lru", slots=2, below=True, tmp_path=tmp_path)
    for i in range(3):
        store.put(key(i), chunk(i))
    with store.pinned([key(0)]):
        assert store.lookup([key(0)]) == ["disk"]
        layered = store.get_layered(key(0))
        assert store.lookup([key(0)]) == ["disk"]  # no promotion work inside the request
        assert same(layered, chunk(0))
    assert store.lookup([key(0)]) == ["cpu"] and store.stats().promotions == 1


def test_pinned_entries_are_not_evicted():
    store = _store("lru", slots=2)
    store.put(key(0), chunk(0))
    with store.pinned([key(0)]):
        store.put(key(1), chunk(1))
        store.put(key(2), chunk(2))  # 0 is least recent but pinned: 1 goes
        assert _held(store, 3) == ["cpu", None, "cpu"]
        with store.pinned([key(2)]):
            store.put(key(3), chunk(3))  # only 3 itself is evictable
            assert _held(store, 4) == ["cpu", None, "cpu", None]
    store.put(key(4), chunk(4))  # unpinned again: plain LRU
    assert _held(store, 5) == [None, None, "cpu", None, "cpu"]


def test_everything_pinned_lets_the_tier_overflow_until_unpinned():
    store = _store("lru", slots=1)
    store.put(key(0), chunk(0))
    store.pin([key(0), key(1)])
    store.put(key(1), chunk(1))
    assert _held(store, 2) == ["cpu", "cpu"] and store.tiers[0].nbytes == 2 * ENTRY
    store.unpin([key(0), key(1)])
    store.put(key(2), chunk(2))
    assert _held(store, 3) == [None, None, "cpu"]
    with pytest.raises(AssertionError, match="not pinned"):
        store.unpin([key(2)])


def test_entry_larger_than_first_tier_goes_below(tmp_path):
    store = TieredStore([MemoryTier(ENTRY // 2), DiskTier(tmp_path / "d", 1 << 20)])
    assert store.put(key(0), chunk(0)) == "disk"


def test_remove_drops_every_copy(tmp_path):
    store = _store("lru", slots=2, below=True, tmp_path=tmp_path)
    for i in range(3):
        store.put(key(i), chunk(i))
    store.get_layered(key(0))
    assert store.remove(key(0)) and _held(store, 1) == [None] and store.get_layered(key(0)) is None


def test_stats_are_json_able(tmp_path):
    import json

    store = _store("cost", slots=2, below=True, tmp_path=tmp_path)
    for i in range(3):
        store.put(key(i), chunk(i))
    d = json.loads(json.dumps(store.stats().to_dict()))
    assert [t["name"] for t in d["tiers"]] == ["cpu", "disk"] and d["evictions"] == 1 and d["corrupt"] == 0
    assert d["tiers"][0]["entries"] == 2 and d["tiers"][0]["bytes"] == 2 * ENTRY


def test_config_builds_and_validates(tmp_path):
    cfg = StorageConfig(
        tiers=(TierConfig("cpu", 1024), TierConfig("disk", 1_000_000)),
        disk_dir=str(tmp_path / "c"),
        policy="cost",
    )
    store = build_store(cfg)
    assert [t.name for t in store.tiers] == ["cpu", "disk"] and store.tiers[0].capacity_bytes == 1024
    assert store.policies[0].name == "cost" and (tmp_path / "c" / "catalog.sqlite").exists()
    store.put(key(0), chunk(0, dtype=torch.float32))  # stored as kv_dtype (float16 by default)
    assert store.get_layered(key(0)).layer(0).dtype == torch.float16
    store.close()
    with pytest.raises(ValueError, match="accepted: gpu, cpu, disk"):
        TierConfig("ssd", 1)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        StorageConfig(policy="fifo")
    with pytest.raises(ValueError, match="must be the last"):
        StorageConfig(tiers=(TierConfig("disk", 1), TierConfig("cpu", 1)))
    with pytest.raises(ValueError, match="known: lru, cost"):
        make_policy("mru")
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        MemoryTier(1, codec="nope")
