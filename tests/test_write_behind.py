"""Chunk KV computed at query time is written behind to the disk tier (off the request path), so a
second process (here: a second store or Engine on the same data dir) hits it."""

from __future__ import annotations

from storage_helpers import chunk, key, same

from ragkv.engine.config import EngineConfig
from ragkv.storage.build import build_store
from ragkv.storage.config import StorageConfig, TierConfig


def _config(tmp_path) -> StorageConfig:
    return StorageConfig(tiers=(TierConfig("cpu", 1 << 20), TierConfig("disk", 1 << 30)), disk_dir=str(tmp_path))


def test_write_behind_reaches_the_disk_and_outlives_the_store(tmp_path):
    store = build_store(_config(tmp_path))
    assert store.put(key(0), chunk(0), write_behind=True) == "cpu"  # the caller gets the fast tier at once
    store.put(key(1), chunk(1))  # without write-behind: memory only
    store.close()  # waits for the copies
    again = build_store(_config(tmp_path))
    assert again.lookup([key(0), key(1)]) == ["disk", None]
    assert same(again.get_layered(key(0)), chunk(0))
    again.close()


def test_a_removed_entry_is_not_written_behind(tmp_path):
    store = build_store(_config(tmp_path))
    with store._lock:  # the writer thread waits for the lock: the removal comes first
        store.put(key(0), chunk(0), write_behind=True)
        store.remove(key(0))
    store.wait_written()
    assert store.lookup([key(0)]) == [None] and len(store.tiers[1]) == 0
    store.close()


def test_a_second_engine_on_the_same_data_dir_hits(smollm2, tmp_path):
    """As two `ragkv query` runs: query-time misses of the first are disk hits of the second."""
    from ragkv.engine.engine import Engine

    docs = ["The Danube flows through Vienna and Budapest.", "The Elbe flows through Dresden and Hamburg."]
    cfg = EngineConfig(data_dir=str(tmp_path))
    first = Engine(smollm2, build_store(cfg.storage_config()), cfg)
    a = first.generate("Which river flows through Vienna?", docs, max_new_tokens=2)
    first.close()
    second = Engine(smollm2, build_store(cfg.storage_config()), cfg)
    b = second.generate("Which river flows through Vienna?", docs, max_new_tokens=2)
    second.close()
    assert (a.misses, a.hits) == (2, {})
    assert (b.misses, b.hits) == (0, {"disk": 2})
    assert b.token_ids == a.token_ids
