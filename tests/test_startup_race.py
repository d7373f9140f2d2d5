"""Two sidecars started at the same moment on one fresh data dir (issue 26, item 1): both create the same
catalog tables at once. Neither may fail, and "damaged" must mean damaged: a catalog whose tables a
neighbour has just created is not damaged, while garbage in the file still is."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from ragkv.retriever.catalog import Catalog as DocumentCatalog
from ragkv.storage import DiskTier
from ragkv.storage.catalog import CatalogDamaged

TRIALS = int(os.environ.get("RAGKV_TEST_STARTUP_TRIALS", "6"))  # docs/BENCHMARKS.md (Hardening) ran 40


def _open_everything(root: str, barrier, out) -> None:
    """What `ragkv serve` opens on its data dir: the disk tier's catalog and the documents' catalog, one file."""
    url = f"sqlite:///{root}/catalog.sqlite"
    try:
        barrier.wait(30)
        tier = DiskTier(f"{root}/cache", 1 << 20, catalog_url=url)
        DocumentCatalog(url, "default").engine.dispose()
        tier.close()
        out.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the parent, which asserts on it
        out.put(f"{type(err).__name__}: {err}")


def test_two_processes_creating_one_fresh_catalog_both_start(tmp_path):
    ctx = mp.get_context("fork")
    results = []
    for trial in range(TRIALS):
        barrier, out = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_everything, args=(str(tmp_path / str(trial)), barrier, out)) for _ in "ab"]
        for p in procs:
            p.start()
        barrier.wait(30)
        results += [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    assert results == ["ok"] * 2 * TRIALS, [r for r in results if r != "ok"][:3]


def test_garbage_in_the_catalog_is_still_damage(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "catalog.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 12)
    with pytest.raises(CatalogDamaged, match="is damaged"):
        DiskTier(tmp_path / "cache", 1 << 20, catalog_url=f"sqlite:///{tmp_path}/catalog.sqlite")
