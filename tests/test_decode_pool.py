"""DecodePool: cachegen layers decoded in worker processes are bit-identical to inline decoding; a
section that does not parse raises the same CodecError; a dead worker breaks the pool and callers
finish inline; the store starts, lends and closes the pool; the blend loop prefetches ahead."""

from __future__ import annotations

import logging
import time
import zlib

import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKey, LayeredKV
from ragkv.compression import CacheGenCodec, CodecError, DecodePool, DecodePoolError, EncodedKV, get_codec


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2) as p:
        yield p


def _entries(n: int, dtype=torch.float16):
    codec = CacheGenCodec()
    kvs = [make_kv(shape=(2, 4, 37 + 9 * i, 2, 16), dtype=dtype, seed=i) for i in range(n)]
    return codec, kvs, [codec.encode(kv) for kv in kvs]


def test_pool_decodes_bit_identical_to_inline(pool):
    assert pool.wait_ready(timeout=60)
    codec, _, encs = _entries(3)
    inline = [codec.decode(e) for e in encs]
    pooled = pool.decode_many(codec, encs)
    for a, b in zip(inline, pooled):
        assert a.kv.dtype == b.kv.dtype == torch.float16 and torch.equal(a.kv, b.kv) and b.pos0 == a.pos0
    one = pool.decode(codec, encs[1], dtype=torch.float32)
    assert one.kv.dtype == torch.float32 and torch.equal(one.kv, codec.decode(encs[1], dtype=torch.float32).kv)
    layer = pool.submit(codec.layer_task(encs[2], 3)).result(timeout=60)
    assert torch.equal(layer, codec.decode_layer(encs[2], 3))


def test_pool_bfloat16_and_codecs_that_gain_nothing(pool):
    codec, _, encs = _entries(1, dtype=torch.bfloat16)
    assert torch.equal(pool.decode(codec, encs[0]).kv, codec.decode(encs[0]).kv)
    int8 = get_codec("int8")
    assert not int8.parallel_decode  # decoded inline: a worker would only add copies
    kv = make_kv()
    assert torch.equal(pool.decode(int8, int8.encode(kv)).kv, int8.decode(int8.encode(kv)).kv)


def test_a_section_that_does_not_parse_fails_as_inline(pool):
    codec, _, (enc,) = _entries(1)
    offsets = enc.meta["offsets"]
    section = bytearray(enc.payload[offsets[1] : offsets[2]])
    c = 2 * 16  # channels: steps and centres (4 bytes each per channel), K/V flags, then the first stream
    first_stream = 8 * c + (2 * c + 7) // 8
    section[first_stream : first_stream + 4] = (99).to_bytes(4, "little")  # k = 99: no such layout
    payload = enc.payload[: offsets[1]] + bytes(section) + enc.payload[offsets[2] :]
    crc = list(enc.meta["crc"])
    crc[1] = zlib.crc32(section)  # the CRC vouches for the bytes: only parsing can catch this
    bad = EncodedKV(enc.codec, payload, {**enc.meta, "crc": crc})
    with pytest.raises(CodecError, match="layer 1 does not decode: malformed entropy stream header"):
        codec.decode_layer(bad, 1)
    with pytest.raises(CodecError, match="layer 1 does not decode: malformed entropy stream header"):
        pool.submit(codec.layer_task(bad, 1)).result(timeout=60)
    assert pool.alive  # a bad entry is the caller's error, not the pool's
    assert torch.equal(pool.decode(codec, enc).kv, codec.decode(enc).kv)


def test_submit_checks_its_output_buffer(pool):
    codec, kvs, (enc,) = _entries(1)
    task = codec.layer_task(enc, 0)
    with pytest.raises(ValueError, match="contiguous K and V halves"):
        pool.submit(task, torch.empty(2, kvs[0].num_tokens, 2, 16, dtype=torch.float32))
    out = torch.empty(2, 4, kvs[0].num_tokens, 2, 16, dtype=torch.float16)  # [2, L, T, H, D]
    assert pool.submit(task, out[:, 0]).result(timeout=60).data_ptr() == out[:, 0].data_ptr()
    assert torch.equal(out[:, 0], codec.decode_layer(enc, 0))


def test_a_dead_worker_breaks_the_pool_and_callers_finish_inline(caplog):
    codec, _, encs = _entries(2)
    expected = [codec.decode(e).kv for e in encs]
    with caplog.at_level(logging.WARNING), DecodePool(2) as doomed:
        assert torch.equal(doomed.decode(codec, encs[0]).kv, expected[0])  # both workers up and answering
        doomed._procs[0].proc.kill()
        doomed._procs[0].proc.wait()
        got = doomed.decode_many(codec, encs)  # whatever the pool had taken fails over to inline decoding
        assert all(torch.equal(g.kv, e) for g, e in zip(got, expected))
        deadline = time.monotonic() + 10
        while doomed.alive and time.monotonic() < deadline:  # the reader thread notices the closed pipe
            time.sleep(0.02)
        assert not doomed.alive
        with pytest.raises(DecodePoolError, match="stopped"):
            doomed.submit(codec.layer_task(encs[0], 0))
        assert torch.equal(doomed.decode(codec, encs[1]).kv, expected[1])  # inline now
    assert "decode worker pid" in caplog.text


def test_close_is_idempotent_and_refuses_new_work():
    codec, _, (enc,) = _entries(1)
    p = DecodePool(1)
    assert torch.equal(p.decode(codec, enc).kv, codec.decode(enc).kv)
    p.close()
    p.close()
    assert not p.alive and all(w.proc.poll() is not None for w in p._procs)
    with pytest.raises(DecodePoolError, match="closed"):
        p.submit(codec.layer_task(enc, 0))
    assert torch.equal(p.decode(codec, enc).kv, codec.decode(enc).kv)  # inline once closed
    with pytest.raises(ValueError, match="workers >= 1"):
        DecodePool(0)


def test_store_lends_its_pool_to_the_tiers_and_closes_it(tmp_path):
    from ragkv.storage import materialize
    from ragkv.storage.build import build_store, decode_workers
    from ragkv.storage.config import StorageConfig, TierConfig

    assert decode_workers(StorageConfig(tiers=(TierConfig("cpu", 1 << 30),))) == 0  # identity: nothing to gain
    cfg = StorageConfig(
        tiers=(TierConfig("cpu", 1 << 30, codec="cachegen"), TierConfig("disk", 1 << 30, codec="cachegen")),
        disk_dir=str(tmp_path),
        decode_workers=1,
        promote=False,
    )
    assert decode_workers(cfg) == 1
    assert decode_workers(StorageConfig(tiers=cfg.tiers, decode_workers=0)) == 0
    with pytest.raises(ValueError, match="decode_workers must be >= 0"):
        StorageConfig(decode_workers=-1)
    store = build_store(cfg)
    pool = store.decode_pool
    assert pool is not None and pool.workers == 1 and all(t.decode_pool is pool for t in store.tiers)
    kv = make_kv(shape=(2, 3, 50, 2, 16), dtype=torch.float16)
    key = ChunkKey.of("m", "ns", list(range(50)))
    store.put(key, kv)
    expected = CacheGenCodec().decode(CacheGenCodec().encode(kv)).kv
    src = store.get_layered(key, "cpu")
    for layer in range(3):
        src.prefetch(layer)
    assert set(src._pending) == {0, 1, 2}
    assert torch.equal(torch.stack([src.layer(i) for i in range(3)], dim=1), expected)
    assert not src._pending
    assert torch.equal(materialize(store.get_layered(key, "cpu")).kv, expected)
    store.close()
    assert not pool.alive and all(w.proc.poll() is not None for w in pool._procs)


class _Recording(LayeredKV):
    """A LayeredKV that records prefetch hints and reads."""

    def __init__(self, kv):
        self.kv, self.pos0, self.num_tokens, self.num_layers = kv, kv.pos0, kv.num_tokens, kv.num_layers
        self.events = []

    def prefetch(self, index):
        self.events.append(("prefetch", index))

    def layer(self, index):
        self.events.append(("read", index))
        return self.kv.layer(index)


def test_loader_asks_for_layers_ahead_before_reading():
    from ragkv.blend.loader import LayerLoader

    kv = make_kv(shape=(2, 5, 7, 2, 4))
    src = _Recording(kv)
    rows = list(LayerLoader([kv, src], 5, torch.device("cpu"), torch.float32, lookahead=2))
    assert all(torch.equal(r[:, kv.num_tokens :], kv.layer(i)) for i, r in enumerate(rows))
    reads = [i for e, i in src.events if e == "read"]
    assert reads == [0, 1, 2, 3, 4]
    for layer in range(5):
        before = src.events[: src.events.index(("read", layer))]
        hinted = {i for e, i in before if e == "prefetch"}
        assert set(range(layer, min(layer + 3, 5))) <= hinted  # this layer and the next two were asked for
        assert max(hinted) <= layer + 2  # and nothing further (memory stays bounded)


def test_a_worker_that_cannot_boot_is_reported_and_decoding_goes_on_inline(monkeypatch, tmp_path, caplog):
    import ragkv.compression.pool as pool_module

    monkeypatch.setattr(pool_module, "_PACKAGE_ROOT", str(tmp_path))  # no ragkv there: the import fails
    codec, _, (enc,) = _entries(1)
    with caplog.at_level(logging.WARNING), DecodePool(1) as broken:
        assert broken.wait_ready(timeout=60) is False and not broken.alive
        assert torch.equal(broken.decode(codec, enc).kv, codec.decode(enc).kv)
    assert "stopped (exit code" in caplog.text
