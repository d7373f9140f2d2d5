"""The Redis tier beyond the shared tier contract: sharing between processes, corruption and eviction
made into misses, TTLs, cluster hash tags, write-through from the store, and outages that degrade.

Runs against RAGKV_TEST_REDIS_URL (or .ci/redis_url from .ci/redis.sh); skips with the reason when
no Redis answers. The outage tests need no Redis: they point at a closed loopback port.
"""

from __future__ import annotations

import json
import socket

import pytest
from storage_helpers import chunk, key, redis_url, same

from ragkv.compression import get_codec
from ragkv.engine.config import EngineConfig
from ragkv.storage import MemoryTier, RedisLink, RedisTier, StorageConfig, TierConfig, TieredStore, build_store
from ragkv.storage.tier import TierWriteError


def _tier(prefix: str, codec: str = "identity", **kw) -> RedisTier:
    return RedisTier(redis_url(), 1 << 20, codec, prefix=prefix, ttl_s=600, **kw)


def closed_port_url() -> str:
    """A loopback Redis URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_an_entry_written_by_one_process_is_a_hit_for_another(redis_prefix):
    writer, reader = _tier(redis_prefix, "cachegen"), _tier(redis_prefix, "cachegen")
    writer.put(key(1), chunk(1), cost=42.0)
    assert reader.info(key(1)) is None and reader.lookup(key(1))  # nothing local, yet Redis has it
    got = reader.get(key(1))
    assert got is not None and got.num_layers == 3 and got.num_tokens == 8 and got.pos0 == 1
    assert reader.info(key(1)).cost == 42.0 and reader.nbytes == writer.nbytes
    codec = get_codec("cachegen")  # lossy: the tier must give back exactly what the codec decodes
    assert same(got, codec.decode(codec.encode(chunk(1))))
    assert reader.remove(key(1)) and not writer.lookup(key(1))  # removal is seen by every process


def test_keys_share_a_cluster_hash_tag_and_carry_namespace_and_ttl(redis_prefix):
    tier = _tier(redis_prefix)
    json.dumps(tier.status(), allow_nan=False)  # a link that never failed is strict JSON too
    k = key(3, "tenant-a")
    tier.put(k, chunk(3))
    r = tier.link.client
    names = sorted(n.decode() for n in r.scan_iter(match=f"{redis_prefix}:*"))
    tag = f"{{tenant-a/{k.digest}}}"
    assert names == sorted([f"{redis_prefix}:{tag}:h"] + [f"{redis_prefix}:{tag}:p{i}" for i in range(3)])
    assert all(0 < r.pttl(n) <= 600_000 for n in names)
    from redis.crc import key_slot

    assert len({key_slot(n.encode()) for n in names}) == 1  # one Redis Cluster slot for the whole entry


def test_a_corrupt_part_is_a_miss_and_is_deleted(redis_prefix):
    tier = _tier(redis_prefix)
    tier.put(key(1), chunk(1))
    r = tier.link.client
    part = bytearray(r.get(tier.part_key(key(1), 1)))
    part[5] ^= 0xFF
    r.set(tier.part_key(key(1), 1), bytes(part))
    assert tier.get(key(1)) is None and tier.corrupt == 1
    assert not tier.lookup(key(1)) and r.exists(tier.part_key(key(1), 0)) == 0 and tier.nbytes == 0


def test_a_corrupt_header_is_a_miss(redis_prefix):
    tier = _tier(redis_prefix)
    tier.put(key(1), chunk(1))
    tier.link.client.set(tier.header_key(key(1)), b"RAGKVRD1garbage")
    assert tier.get(key(1)) is None and tier.corrupt == 1 and not tier.lookup(key(1))


def test_a_part_evicted_by_redis_is_a_miss_not_an_error(redis_prefix):
    tier = _tier(redis_prefix)
    tier.put(key(1), chunk(1))
    tier.link.client.delete(tier.part_key(key(1), 2))  # what maxmemory eviction does to one key
    assert tier.get(key(1)) is None and tier.incomplete == 1 and tier.corrupt == 0
    assert not tier.lookup(key(1))


def test_replacing_an_entry_serves_the_new_bytes(redis_prefix):
    tier = _tier(redis_prefix)
    tier.put(key(1), chunk(1))
    tier.put(key(1), chunk(2))
    assert same(tier.get(key(1)), chunk(2)) and len(tier) == 1


def test_store_writes_through_to_redis_and_other_sidecars_hit_it(redis_prefix):
    a = TieredStore([MemoryTier(1 << 20), _tier(redis_prefix, "lz4")])
    b = TieredStore([MemoryTier(1 << 20), _tier(redis_prefix, "lz4")])
    assert a.put(key(1), chunk(1)) == "cpu" and a.tiers[1].lookup(key(1))  # landed in cpu, copied to redis
    assert b.lookup([key(1)]) == ["redis"]
    assert same(b.get_layered(key(1)), chunk(1))
    assert b.lookup([key(1)]) == ["cpu"] and b.stats().hits == {"cpu": 0, "redis": 1}  # promoted
    a.close()
    b.close()


def test_build_store_makes_a_redis_tier_from_config(redis_prefix):
    cfg = StorageConfig(
        tiers=(
            TierConfig("cpu", 1 << 20),
            TierConfig("redis", 1 << 30, "cachegen", url=redis_url(), prefix=redis_prefix),
        ),
        decode_workers=0,
    )
    store, other = build_store(cfg), build_store(cfg)  # two sidecars with the same settings
    tier = store.tiers[1]
    assert isinstance(tier, RedisTier) and tier.codec.name == "cachegen" and tier.prefix == redis_prefix
    assert store.put(key(7), chunk(7)) == "cpu" and tier.lookup(key(7))  # RAM, written through to Redis
    assert tier.header_key(key(7)).startswith(redis_prefix + ":")  # under the configured prefix
    assert other.lookup([key(7)]) == ["redis"]  # the other sidecar finds it there
    codec = get_codec("cachegen")  # stored with the configured (lossy) codec: exactly what it decodes
    assert same(other.get_layered(key(7)), codec.decode(codec.encode(chunk(7))))
    store.close()
    other.close()


def test_tier_config_rejects_a_redis_tier_without_url_and_bad_urls():
    with pytest.raises(ValueError, match="needs url"):
        TierConfig("redis", 1 << 20)
    with pytest.raises(ValueError, match="must start with redis://"):
        RedisLink("http://127.0.0.1:6379")


def test_unreachable_redis_degrades_to_misses_and_write_errors():
    tier = RedisTier(closed_port_url(), 1 << 20, "identity", prefix="ragkv-test-down")
    assert not tier.lookup(key(1)) and tier.get(key(1)) is None and tier.remove(key(1)) is False
    with pytest.raises(TierWriteError, match="not stored"):
        tier.put(key(1), chunk(1))
    s = tier.status()
    json.dumps(s, allow_nan=False)  # served by /v1/cache/stats: must be strict JSON
    assert s["up"] is False and s["outages"] == 1 and s["failed_calls"] >= 4 and "Connection" in s["last_error"]


def test_store_over_a_dead_redis_keeps_serving_from_memory():
    store = TieredStore([MemoryTier(1 << 20), RedisTier(closed_port_url(), 1 << 20, "identity", prefix="x")])
    assert store.put(key(1), chunk(1)) == "cpu"
    assert same(store.get_layered(key(1)), chunk(1)) and store.get_layered(key(2)) is None
    s = store.stats()
    assert s.write_errors == 1 and "not stored" in s.last_error
    store.close()


def test_backoff_skips_calls_then_probes_and_recovers(monkeypatch):
    link = RedisLink(closed_port_url(), backoff_s=60.0)
    assert link.call(lambda r: r.ping(), "fallback") == "fallback" and not link.up
    calls = []
    assert link.call(lambda r: calls.append(1), "skipped") == "skipped" and calls == []  # within the backoff
    link._retry_at = 0.0  # the backoff has passed: the next call probes
    assert link.call(lambda r: "answered", None) == "answered" and link.up and link.outages == 1


def test_serve_settings_put_the_redis_tier_after_ram_and_keep_the_disk_catalog_local(tmp_path):
    from ragkv.server.settings import load_settings

    pg = "postgresql+psycopg://u:p@127.0.0.1:1/db"
    cfg = EngineConfig.from_settings(
        load_settings(redis_url="redis://127.0.0.1:1/0", catalog_url=pg, data_dir=str(tmp_path))
    )
    storage = cfg.storage_config()
    assert [(t.kind, t.codec) for t in storage.tiers] == [("cpu", "identity"), ("redis", "lz4"), ("disk", "lz4")]
    assert storage.catalog_url.startswith("sqlite:///") and cfg.catalog() == pg  # documents shared, disk local
    ram_only = {"storage.tiers": [{"kind": "cpu", "capacity": "2GiB"}]}
    memory = EngineConfig.from_settings(load_settings(redis_url="redis://127.0.0.1:1/0", **ram_only)).storage_config()
    assert [t.kind for t in memory.tiers] == ["cpu", "redis"]


def test_a_request_that_met_an_outage_is_warned_even_after_redis_came_back():
    import time

    from ragkv.storage.health import degraded_warnings

    store = TieredStore([MemoryTier(1 << 20), RedisTier(closed_port_url(), 1 << 20, "identity", prefix="x")])
    t0 = time.perf_counter()
    assert store.lookup([key(1)]) == [None]
    store.tiers[1].link.up = True  # as if the next probe had reconnected
    assert "'redis' is unreachable" in degraded_warnings(store, since=t0)[0]
    assert degraded_warnings(store, since=time.perf_counter()) == [] and degraded_warnings(store) == []
