"""Concurrent readers and writers on a TieredStore (CPU memory over disk): no errors, no wrong data,
and the books balance afterwards (bytes, entries, files, catalog rows)."""

from __future__ import annotations

import random
import threading

from storage_helpers import chunk, key, same

from ragkv.storage import DiskTier, MemoryTier, TieredStore

KEYS = 8
EXPECTED = [chunk(i) for i in range(KEYS)]


def _worker(store: TieredStore, seed: int, errors: list, ops: int = 30) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(ops):
            i = rng.randrange(KEYS)
            if rng.random() < 0.4:
                store.put(key(i), EXPECTED[i])
            else:
                with store.pinned([key(i)]):
                    kv = store.get_layered(key(i))
                    if kv is not None and not same(kv, EXPECTED[i]):
                        errors.append(f"wrong data for key {i}")
    except Exception as err:  # noqa: BLE001 - reported by the test
        errors.append(repr(err))


def test_threads_read_and_write_consistently(tmp_path):
    disk = DiskTier(tmp_path / "d", 5 * (EXPECTED[0].nbytes + 400))  # ~5 entries with headers
    store = TieredStore([MemoryTier(3 * EXPECTED[0].nbytes), disk], policy="cost")
    errors: list[str] = []
    threads = [threading.Thread(target=_worker, args=(store, s, errors)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    s = store.stats()
    assert s.corrupt == 0 and s.write_errors == 0 and sum(s.hits.values()) > 0 and s.demotions > 0
    for tier in store.tiers:
        assert tier.nbytes == sum(i.nbytes for i in tier.infos())
    files = sorted((disk.root / "data").rglob("*.kv"))
    assert len(files) == len(disk) == len(disk.catalog.rows())
    assert all(same(store.get_layered(key(i)), EXPECTED[i]) for i in range(KEYS) if store.lookup([key(i)])[0])
    store.close()
