"""Disk tier beside other processes and under damage: the opening check touches only what is provably
dead, a dry run changes nothing, a damaged catalog heals from payload headers (or says how), a layer
failing only its CRC is a dropped entry, a file deleted under an open tier is noticed, and dropping a
row never deletes another entry's file. (The SIGKILL loop is benchmarks/bench_store_hardening.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time

import pytest
from storage_helpers import chunk, key, same

from ragkv.storage import DiskTier, TieredStore
from ragkv.storage.catalog import CatalogDamaged, CatalogRow
from ragkv.storage.payload import MAGIC


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*.kv"))


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_check_spares_a_live_writers_temp_and_uncommitted_files(tmp_path):
    writer = DiskTier(tmp_path / "d", 1 << 20)
    writer.put(key(0), chunk(0))
    temp = writer.root / "tmp" / f"{writer.writer_id}.inflight.tmp"  # a put between its write and rename
    temp.write_bytes(b"partial")
    pending = writer.root / "data" / "default" / f"{key(1).digest}.abc.kv"  # renamed, row not yet committed
    pending.write_bytes((writer.root / _files(writer.root)[0]).read_bytes())
    other = DiskTier(tmp_path / "d", 1 << 20)  # another process opening (and checking) the same tier
    assert other.last_check.temp_files_removed == 0 and other.last_check.orphan_files_removed == 0
    assert other.last_check.files_spared == 2 and temp.exists() and pending.exists()
    assert other.lookup(key(0)) and writer.lookup(key(0))
    writer.put(key(2), chunk(2))  # the writer goes on; the checker reopens and keeps every committed row
    other.close()
    again = DiskTier(tmp_path / "d", 1 << 20)
    assert again.lookup(key(0)) and again.lookup(key(2)) and same(again.get(key(2)), chunk(2))
    again.close()
    writer.close()


def test_dead_writers_temp_files_go_and_a_dry_run_changes_nothing(tmp_path):
    t = DiskTier(tmp_path / "d", 1 << 20, grace_s=0)
    for i in range(3):
        t.put(key(i), chunk(i))
    (t.root / "tmp" / "123-deadbeef.x.tmp").write_bytes(b"left by a killed writer")  # no lock held: dead
    junk = t.root / "data" / "default" / f"{key(7).digest}.bad.kv"
    junk.write_bytes(b"not a payload")
    _age(junk, 3600)
    (t.root / t._index[key(0)].file).unlink()  # a row without its file
    t.close()
    before = (_files(tmp_path / "d"), sorted(os.listdir(tmp_path / "d" / "tmp")))
    dry = DiskTier(tmp_path / "d", 1 << 20, grace_s=0, repair=False)
    r = dry.last_check
    assert r.dry_run and (r.temp_files_removed, r.orphan_files_removed, r.rows_dropped) == (1, 1, 1)
    assert len(dry.catalog.rows()) == 3  # the row without a file is still there
    dry.close()
    assert (_files(tmp_path / "d"), sorted(os.listdir(tmp_path / "d" / "tmp"))) == before
    fixed = DiskTier(tmp_path / "d", 1 << 20, grace_s=0)
    r = fixed.last_check
    assert (r.temp_files_removed, r.orphan_files_removed, r.rows_dropped, r.entries) == (1, 1, 1, 2)
    assert not junk.exists() and os.listdir(tmp_path / "d" / "tmp") == []
    fixed.close()


def _fill(root, n=12) -> dict[str, bytes]:
    t = DiskTier(root, 1 << 20)
    for i in range(n):
        t.put(key(i), chunk(i))
    t.close()
    return {rel: (root / rel).read_bytes() for rel in _files(root)}


@pytest.mark.parametrize("trial", range(6))
def test_random_catalog_damage_deletes_no_healthy_payload(tmp_path, trial):
    healthy = _fill(tmp_path / "d")
    db = tmp_path / "d" / "catalog.sqlite"
    rng = random.Random(trial)
    at = rng.randrange(0, db.stat().st_size - 64)
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(bytes(rng.randrange(256) for _ in range(64)))
    again = DiskTier(tmp_path / "d", 1 << 20, grace_s=0)  # the tier's own catalog: healed or repaired
    assert all(same(again.get(key(i)), chunk(i)) for i in range(12))
    again.close()
    assert all((tmp_path / "d" / rel).read_bytes() == data for rel, data in healthy.items())


def test_garbage_catalog_heals_from_payload_headers(tmp_path):
    _fill(tmp_path / "d", 4)
    (tmp_path / "d" / "catalog.sqlite").write_bytes(b"garbage" * 1000)
    again = DiskTier(tmp_path / "d", 1 << 20)
    assert again.last_check.healed_from and again.last_check.files_adopted == 4
    assert all(same(again.get(key(i)), chunk(i)) for i in range(4))
    again.close()


def test_a_damaged_shared_catalog_is_a_clear_error_and_touches_no_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    t = DiskTier(tmp_path / "d", 1 << 20, catalog_url=url)
    t.put(key(0), chunk(0))
    t.close()
    files = _files(tmp_path / "d")
    (tmp_path / "shared.sqlite").write_bytes(b"garbage" * 1000)
    with pytest.raises(CatalogDamaged, match=r"is damaged .*To heal: stop every ragkv process.*move .*aside"):
        DiskTier(tmp_path / "d", 1 << 20, catalog_url=url)
    assert _files(tmp_path / "d") == files and (tmp_path / "shared.sqlite").read_bytes().startswith(b"garbage")


def _break_layer_crc_only(path) -> None:
    """Flip a byte of the last layer and re-seal the file's SHA-256: only that layer's CRC32 fails."""
    data = bytearray(path.read_bytes())
    head_len = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    head = bytes(data[start : start + head_len])
    body = start + head_len + 32
    data[-3] ^= 0x40
    h = hashlib.sha256(head)
    h.update(bytes(data[body:]))
    data[start + head_len : body] = h.digest()
    path.write_bytes(bytes(data))


def test_a_layer_failing_only_its_crc_is_a_dropped_entry(tmp_path):
    disk = DiskTier(tmp_path / "d", 1 << 20)
    store = TieredStore([disk])
    store.put(key(0), chunk(0))
    path = disk.root / disk._index[key(0)].file
    _break_layer_crc_only(path)
    row = disk._index[key(0)]
    disk._index[key(0)] = CatalogRow(row.info, row.file, row.codec, _sha(path))  # only the CRC can tell now
    assert store.get_layered(key(0)) is None  # a miss (recomputed by the engine), never a CodecError
    assert store.stats().corrupt == 1 and not disk.lookup(key(0)) and not path.exists()
    store.close()


def _sha(path) -> str:
    data = path.read_bytes()
    head_len = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    return data[len(MAGIC) + 4 + head_len : len(MAGIC) + 4 + head_len + 32].hex()


def test_a_file_deleted_under_an_open_tier_is_dropped_on_read(tmp_path):
    disk = DiskTier(tmp_path / "d", 1 << 20)
    disk.put(key(0), chunk(0))
    (disk.root / disk._index[key(0)].file).unlink()  # another process evicted it
    assert disk.get(key(0)) is None and not disk.lookup(key(0)) and disk.nbytes == 0
    assert disk.catalog.rows() == []
    disk.close()


def test_a_replacement_by_another_process_is_followed_on_read(tmp_path):
    a = DiskTier(tmp_path / "d", 1 << 20)
    b = DiskTier(tmp_path / "d", 1 << 20)
    a.put(key(0), chunk(0))
    b.check()
    b.put(key(0), chunk(5))  # b replaces a's version: a's file is gone, the catalog names b's
    a_old = a._index[key(0)].file
    b.put(key(0), chunk(6))
    assert not (a.root / a_old).exists()
    assert same(a.get(key(0)), chunk(6))
    a.close()
    b.close()


def test_dropping_a_corrupt_row_deletes_only_its_own_file(tmp_path):
    disk = DiskTier(tmp_path / "d", 1 << 20)
    disk.put(key(0), chunk(0))
    disk.put(key(1), chunk(1))
    other = disk._index[key(1)].file
    with sqlite3.connect(disk.root / "catalog.sqlite") as conn:  # a damaged row names key 1's file
        conn.execute("UPDATE ragkv_chunks SET file = ? WHERE key = ?", (other, str(key(0))))
    disk.close()
    again = DiskTier(tmp_path / "d", 1 << 20)
    assert (again.root / other).exists() and same(again.get(key(1)), chunk(1))
    assert not again.lookup(key(0)) and again.last_check.rows_dropped == 1
    row = again._index[key(1)]
    again._index[key(0)] = row  # even a row in memory naming another key's file: dropped, file kept
    assert again.get(key(0)) is None and (again.root / other).exists() and same(again.get(key(1)), chunk(1))
    again.close()
    assert json.dumps(again.last_check.__dict__)  # the report stays JSON-able for `ragkv cache gc --json`


def test_cache_stats_and_gc_dry_run_change_nothing(tmp_path, capsys):
    from ragkv.cli.main import main
    from ragkv.engine.config import EngineConfig
    from ragkv.storage.build import build_store

    store = build_store(EngineConfig(data_dir=str(tmp_path)).storage_config())
    store.tiers[-1].put(key(0), chunk(0))
    root = store.tiers[-1].root
    store.close()
    (root / "tmp" / "99-0badc0de.x.tmp").write_bytes(b"a dead writer's")
    junk = root / "data" / "default" / f"{key(3).digest}.old.kv"
    junk.write_bytes(b"damaged")
    _age(junk, 3600)

    def listing():
        return sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "catalog" not in p.name
        )

    before = listing()
    assert main(["cache", "stats", "--data-dir", str(tmp_path), "--json"]) == 0
    assert main(["cache", "gc", "--data-dir", str(tmp_path), "--dry-run", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.rindex('{\n  "entries"') :])["disk_check"]["disk"]
    assert report["dry_run"] and report["temp_files_removed"] == 1 and report["orphan_files_removed"] == 1
    assert listing() == before
    assert main(["cache", "gc", "--data-dir", str(tmp_path), "--json"]) == 0
    assert not junk.exists() and not (root / "tmp" / "99-0badc0de.x.tmp").exists()
