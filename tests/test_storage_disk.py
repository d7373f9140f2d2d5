"""Disk tier failure modes: corrupt payloads are misses, crashes leave nothing half-visible, full or
unwritable disks are reported without losing entries, and a store survives a restart."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from storage_helpers import chunk, key, same

from ragkv.compression import CodecError
from ragkv.storage import DiskTier, MemoryTier, TieredStore, TierWriteError
from ragkv.storage import disk as disk_module


class Crash(BaseException):
    """A process dying mid-write: nothing below catches it."""


def _files(root):
    return sorted(p.name for p in (root / "data").rglob("*.kv"))


def _tmpfiles(root):
    return list((root / "tmp").iterdir())


def _path(tier: DiskTier, i: int):
    return tier.root / tier._index[key(i)].file


@pytest.fixture
def tier(tmp_path):
    t = DiskTier(tmp_path / "cache", 1 << 20)
    for i in range(2):
        t.put(key(i), chunk(i))
    yield t
    t.close()


def _truncate(path):
    os.truncate(path, path.stat().st_size - 7)


def _flip_payload(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_header(path):
    data = bytearray(path.read_bytes())
    i = data.index(b'"num_tokens":8')
    data[i + 13] = ord("9")
    path.write_bytes(bytes(data))


def _foreign(path, other):
    path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "foreign"])
def test_corrupt_payload_is_a_counted_miss(tier, damage):
    tier.layer_reads = damage != "flip_payload"  # read layer by layer, a payload flip is found when read (below)
    path = _path(tier, 0)
    {
        "truncate": _truncate,
        "flip_payload": _flip_payload,
        "flip_header": _flip_header,
        "foreign": lambda p: _foreign(p, _path(tier, 1)),
    }[damage](path)
    store = TieredStore([tier])
    assert store.get_layered(key(0)) is None
    s = store.stats()
    assert s.misses == 1 and s.corrupt == 1 and s.hits == {"disk": 0}
    assert not tier.lookup(key(0)) and not path.exists() and len(tier.catalog.rows()) == 1
    assert same(store.get_layered(key(1)), chunk(1))  # the neighbour is untouched
    store.put(key(0), chunk(0))  # recomputed and stored again
    assert same(store.get_layered(key(0)), chunk(0))


def test_a_damaged_layer_is_caught_when_read_and_the_entry_dropped(tier):
    """Read layer by layer (the default), `get` reads the header only; the flipped layer fails its CRC32 when
    it is read, the entry is dropped then (counted corrupt), and the undamaged layers read before were good."""
    path = _path(tier, 0)
    _flip_payload(path)  # 100 bytes before the end: the last layer
    store = TieredStore([tier])
    kv = store.get_layered(key(0))
    assert kv is not None and kv.bytes_read == 0
    assert torch.equal(kv.layer(0), chunk(0).layer(0))
    with pytest.raises(CodecError, match="CRC32"):
        kv.layer(kv.num_layers - 1)
    assert tier.corrupt == 1 and not tier.lookup(key(0)) and not path.exists()
    assert store.get(key(0)) is None and store.get(key(1)) is not None  # a miss now; the neighbour is untouched


def test_corrupt_lower_copy_falls_back_to_a_miss_then_recompute(tmp_path):
    disk = DiskTier(tmp_path / "d", 1 << 20)
    store = TieredStore([MemoryTier(chunk(0).nbytes), disk])
    store.put(key(0), chunk(0))
    store.put(key(1), chunk(1))  # 0 demoted to disk
    _flip_payload(_path(disk, 0))
    assert store.lookup([key(0)]) == ["disk"] and store.get_layered(key(0)) is None
    assert store.stats().corrupt == 1 and store.lookup([key(0)]) == [None]


def test_crash_between_file_and_catalog_spares_then_adopts_the_whole_file(tier, tmp_path, monkeypatch):
    def die(row):
        raise Crash()

    monkeypatch.setattr(tier.catalog, "upsert", die)
    with pytest.raises(Crash):
        tier.put(key(5), chunk(5))
    assert not tier.lookup(key(5)) and len(_files(tier.root)) == 3  # an unnamed file, invisible
    monkeypatch.undo()
    tier.close()
    again = DiskTier(tmp_path / "cache", 1 << 20)  # within the grace period: maybe a writer's, left alone
    assert again.last_check.files_spared == 1 and again.last_check.entries == 2
    assert len(_files(again.root)) == 3 and not again.lookup(key(5))
    again.close()
    later = DiskTier(tmp_path / "cache", 1 << 20, grace_s=0)  # past it: a whole file gets its row back
    assert later.last_check.files_adopted == 1 and later.last_check.orphan_files_removed == 0
    assert all(same(later.get(key(i)), chunk(i)) for i in (0, 1, 5))
    later.close()


def test_crash_while_writing_the_file_leaves_only_a_temp_file(tier, tmp_path, monkeypatch):
    def die(fd):
        raise Crash()

    monkeypatch.setattr(disk_module.os, "fsync", die)
    with pytest.raises(Crash):
        tier.put(key(5), chunk(5))
    monkeypatch.undo()
    assert len(_tmpfiles(tier.root)) == 1 and not tier.lookup(key(5))
    tier.close()
    again = DiskTier(tmp_path / "cache", 1 << 20)
    assert again.last_check.temp_files_removed == 1 and _tmpfiles(again.root) == []
    again.close()


def test_missing_or_resized_file_drops_its_row_at_start(tier, tmp_path):
    _path(tier, 0).unlink()
    _truncate(_path(tier, 1))
    tier.close()
    again = DiskTier(tmp_path / "cache", 1 << 20)
    assert again.last_check.rows_dropped == 2 and len(again) == 0 and again.nbytes == 0
    assert again.catalog.rows() == []
    again.close()


@pytest.mark.parametrize(
    "err, where, words",
    [
        (errno.ENOSPC, "fsync", "disk full"),
        (errno.EACCES, "replace", "permission denied"),
        (errno.EROFS, "replace", "read-only"),
    ],
)
def test_full_or_unwritable_disk_is_reported_and_keeps_entries(tier, monkeypatch, err, where, words):
    def fail(*args):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(disk_module.os, where, fail)
    with pytest.raises(TierWriteError, match=f"could not write .*{words}.*existing entries are kept"):
        tier.put(key(5), chunk(5))
    with pytest.raises(TierWriteError, match=words):
        tier.put(key(0), chunk(7))  # a failed replace keeps the old entry
    monkeypatch.undo()
    assert not tier.lookup(key(5)) and _tmpfiles(tier.root) == [] and len(_files(tier.root)) == 2
    assert all(same(tier.get(key(i)), chunk(i)) for i in range(2))


def test_store_counts_a_failed_demotion_and_goes_on(tmp_path, monkeypatch):
    disk = DiskTier(tmp_path / "d", 1 << 20)
    store = TieredStore([MemoryTier(chunk(0).nbytes), disk])
    store.put(key(0), chunk(0))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module.os, "fsync", full)
    assert store.put(key(1), chunk(1)) == "cpu"  # 0 could not be demoted: dropped, reported
    s = store.stats()
    assert s.write_errors == 1 and "disk full" in s.last_error and s.demotions == 0
    assert store.lookup([key(0), key(1)]) == [None, "cpu"]


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TierWriteError, match="cannot create"):
        DiskTier(tmp_path / "file" / "cache")


def test_store_restart_keeps_disk_entries(tmp_path):
    def open_store():
        return TieredStore([MemoryTier(chunk(0).nbytes), DiskTier(tmp_path / "d", 1 << 20)])

    store = open_store()
    for i in range(2):
        store.put(key(i), chunk(i))  # 0 demoted to disk
    store.close()
    store = open_store()
    assert store.lookup([key(0), key(1)]) == ["disk", None]  # memory is gone, disk is not
    assert same(store.get_layered(key(0)), chunk(0)) and store.lookup([key(0)]) == ["cpu"]
    store.close()


def test_recency_and_clock_survive_restart(tmp_path):
    size = DiskTier(tmp_path / "probe", 1 << 20).put(key(0), chunk(0)).nbytes

    def open_store():
        return TieredStore([DiskTier(tmp_path / "d", int(3.5 * size))], policy="lru")  # room for 3

    store = open_store()
    for i in range(3):
        store.put(key(i), chunk(i))
    store.get_layered(key(0))  # recency, oldest first: 1, 2, 0
    store.close()
    store = open_store()
    store.put(key(3), chunk(3))  # newer than anything before the restart -> evicts 1
    assert store.lookup([key(i) for i in range(4)]) == ["disk", None, "disk", "disk"]
    store.close()


def test_layered_payloads_digest_the_header_and_crc_every_layer(tmp_path):
    """New files of a layered codec carry a header-only SHA-256 (the header's CRC32s cover the payload):
    a flipped payload byte still fails the read; a file of the old format (SHA-256 over header + payload)
    still reads; a header-only digest without CRC32s is refused."""
    import io
    import json

    from ragkv.compression import EncodedKV, get_codec
    from ragkv.storage.payload import _LEN, MAGIC, CorruptPayload, _checksum, pack_header, read_payload

    k, kv = key(1), chunk(1)
    enc = get_codec("int8").encode(kv)
    header, checksum = pack_header(k, enc, kv.pos0, kv.num_tokens, kv.num_layers)
    assert b'"digest":"header"' in header
    assert read_payload(io.BytesIO(header + enc.payload), k, checksum).enc.payload == enc.payload
    flipped = bytearray(enc.payload)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(CorruptPayload, match="CRC32"):
        read_payload(io.BytesIO(header + bytes(flipped)), k)

    head = {"key": str(k), "codec": enc.codec, "meta": enc.meta, "pos0": kv.pos0}
    head |= {"num_tokens": kv.num_tokens, "num_layers": kv.num_layers, "payload_len": len(enc.payload)}
    old_json = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    old = MAGIC + _LEN.pack(len(old_json)) + old_json + _checksum(old_json, enc.payload) + enc.payload
    assert read_payload(io.BytesIO(old), k).enc.payload == enc.payload  # written before this change

    bare = EncodedKV(enc.codec, enc.payload, {k2: v for k2, v in enc.meta.items() if k2 != "crc"})
    forged = dict(head, meta=bare.meta, digest="header")
    forged_json = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    forged_file = MAGIC + _LEN.pack(len(forged_json)) + forged_json + _checksum(forged_json, b"") + enc.payload
    with pytest.raises(CorruptPayload, match="without per-layer CRC32s"):
        read_payload(io.BytesIO(forged_file), k)
