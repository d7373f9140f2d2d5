"""One contract for every tier: CPU memory, disk + SQLite, disk + PostgreSQL, CUDA memory, Redis; every codec.

PostgreSQL runs when RAGKV_TEST_PG_URL (or .ci/pg_url from .ci/postgres.sh) names a live server,
Redis when RAGKV_TEST_REDIS_URL (or .ci/redis_url from .ci/redis.sh) does, CUDA when a GPU is present;
otherwise those cases skip with the reason.
"""

from __future__ import annotations

import pytest
import torch
from storage_helpers import (
    BytesCodec,
    chunk,
    key,
    pg_url_or_skip,
    redis_skip_reason,
    redis_url,
    same,
    unique_name,
)

from ragkv.chunk_cache import LayeredKV
from ragkv.compression import CODECS, get_codec
from ragkv.storage import DiskTier, MemoryTier, RedisTier, TieredStore

TIERS = ["cpu", "disk-sqlite", "disk-pg", "gpu", "redis"]
CODEC_NAMES = sorted({*CODECS, "test-bytes"})


def _codec(name: str):
    return BytesCodec() if name == "test-bytes" else get_codec(name)


@pytest.fixture(params=TIERS)
def make_tier(request, tmp_path):
    """`make_tier(codec)` -> a tier; for disk, calling it again reopens the same directory + catalog."""
    kind = request.param
    made = []
    url = None
    if kind == "disk-pg":
        url = pg_url_or_skip()
    if kind == "gpu" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if kind == "redis" and (why := redis_skip_reason()):
        pytest.skip(why)
    name = unique_name("disk-pg") if kind == "disk-pg" else "disk"
    prefix = unique_name("ragkv-test")  # each test its own key space on the shared Redis

    def make(codec: str = "identity"):
        if kind == "redis":
            tier = RedisTier(redis_url(), 1 << 20, _codec(codec), prefix=prefix, ttl_s=600)
        elif kind.startswith("disk"):
            tier = DiskTier(tmp_path / "cache", 1 << 20, _codec(codec), catalog_url=url, name=name)
        else:
            tier = MemoryTier(1 << 20, device="cuda" if kind == "gpu" else "cpu", codec=_codec(codec))
        made.append(tier)
        return tier

    make.persistent = kind.startswith("disk")
    yield make
    if kind == "disk-pg":
        made[-1].catalog.clear()
    if kind == "redis" and made:
        made[-1].clear()
    for tier in made:
        tier.close()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_roundtrip_layer_by_layer(make_tier, codec):
    tier = make_tier(codec)
    kv = chunk(1)
    info = tier.put(key(1), kv)
    got = tier.get(key(1))
    assert isinstance(got, LayeredKV)
    assert got.pos0 == kv.pos0 and got.num_layers == 3 and got.num_tokens == 8
    if _codec(codec).lossless:
        assert same(got, kv)
    else:  # lossy codecs: shape and finiteness here; their error bounds are compression's tests
        assert all(torch.isfinite(got.layer(i).float()).all() for i in range(3))
    assert info.num_tokens == 8 and info.cost == 8.0 and info.nbytes > 0
    assert tier.nbytes == info.nbytes and len(tier) == 1 and tier.keys() == [key(1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_bit_exact(make_tier, dtype):
    tier = make_tier()
    kv = chunk(2, dtype=dtype, pos0=7)
    tier.put(key(2), kv)
    got = tier.get(key(2))
    assert got.layer(0).dtype == dtype and same(got, kv)


def test_miss_is_none(make_tier):
    tier = make_tier()
    assert tier.get(key(9)) is None
    assert not tier.lookup(key(9)) and tier.info(key(9)) is None
    assert tier.remove(key(9)) is False


def test_lookup_and_info_have_no_side_effects(make_tier):
    tier = make_tier()
    tier.put(key(1), chunk(1))
    before = [(i.key, i.hits, i.last_access, i.priority) for i in tier.infos()]
    for _ in range(3):
        assert tier.lookup(key(1)) and tier.info(key(1)) is not None
    assert [(i.key, i.hits, i.last_access, i.priority) for i in tier.infos()] == before


def test_replace_and_remove_account_bytes(make_tier):
    tier = make_tier()
    tier.put(key(1), chunk(1))
    tier.put(key(1), chunk(2))
    tier.put(key(3), chunk(3))
    assert len(tier) == 2 and tier.nbytes == sum(i.nbytes for i in tier.infos())
    assert same(tier.get(key(1)), chunk(2))
    assert tier.remove(key(1)) is True and tier.remove(key(1)) is False
    assert tier.get(key(1)) is None and tier.nbytes == tier.info(key(3)).nbytes


def test_stored_copy_is_private(make_tier):
    tier = make_tier()
    kv = chunk(4)
    tier.put(key(4), kv)
    kv.kv.zero_()
    assert same(tier.get(key(4)), chunk(4))


def test_namespaces_are_separate(make_tier):
    tier = make_tier()
    tier.put(key(1, "tenant-a"), chunk(1))
    assert tier.lookup(key(1, "tenant-a")) and not tier.lookup(key(1, "tenant-b"))


def test_restart_keeps_entries(make_tier):
    if not make_tier.persistent:
        pytest.skip("memory tiers do not persist")
    tier = make_tier()
    for i in range(3):
        tier.put(key(i), chunk(i), cost=10.0 + i)
    tier.close()
    again = make_tier()
    assert again.last_check.entries == 3 and again.last_check.orphan_files_removed == 0
    assert sorted(again.keys()) == sorted(key(i) for i in range(3))
    assert all(same(again.get(key(i)), chunk(i)) for i in range(3))
    assert again.info(key(2)).cost == 12.0


def test_store_over_tier_reads_and_counts(make_tier):
    store = TieredStore([make_tier()])
    assert store.put(key(1), chunk(1)) == store.tiers[0].name
    assert store.lookup([key(1), key(2)]) == [store.tiers[0].name, None]
    with store.pinned([key(1)]):
        assert same(store.get_layered(key(1)), chunk(1))
    assert store.get_layered(key(2)) is None
    store.put(key(3), chunk(3))
    many = store.get_layered_many([key(3), key(2), key(1)])
    assert many[1] is None and same(many[0], chunk(3)) and same(many[2], chunk(1))
    s = store.stats()
    assert s.hits == {store.tiers[0].name: 3} and s.misses == 2 and s.puts == 2
    store.close()


def test_layered_views_materialize_to_the_same_chunk():
    from ragkv.storage import EncodedLayers, ResidentKV, materialize

    kv = chunk(5)
    codec = BytesCodec()
    views = [
        ResidentKV(kv, torch.device("cpu")),
        EncodedLayers(codec.encode(kv), codec, kv.pos0, kv.num_tokens, kv.num_layers, torch.device("cpu")),
    ]
    for view in views:
        assert isinstance(view, LayeredKV) and same(view, kv)
        assert torch.equal(materialize(view).kv, kv.kv) and materialize(view).pos0 == kv.pos0
    with pytest.raises(IndexError, match="out of range"):
        views[1].layer(3)
