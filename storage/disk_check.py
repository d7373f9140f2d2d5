"""`DiskTier.check()`: the start-up reconciliation of a disk tier's catalog with its files (storage/disk.py
says what it may touch: only what is provably dead), and the catalog heal that moves a damaged SQLite file
aside. A mixin of `DiskTier`: it reads and repairs the tier's index, catalog and directories."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..chunk_cache import ChunkKey
from .catalog import DAMAGE_ERRORS, CatalogDamaged, CatalogRow, damage_reason
from .files import file_mtime, file_size, lock_held, unlink_if_present
from .payload import CorruptPayload, read_any_payload
from .tier import EntryInfo

log = logging.getLogger(__name__)
WRITER_ID = re.compile(r"[0-9]+-[0-9a-f]{8}")  # pid-random: names a writer's lock and temp files
GRACE_S = 600.0  # unnamed payload files younger than this may belong to a writer about to commit them


@dataclass(frozen=True)
class CheckReport:
    """What `DiskTier.check()` repaired (or, with `dry_run`, would repair)."""

    entries: int
    orphan_files_removed: int
    temp_files_removed: int
    rows_dropped: int
    files_adopted: int = 0  # whole payload files no row named, given their row back from the header
    files_spared: int = 0  # unnamed files younger than the grace period, temp files of live writers
    dry_run: bool = False
    healed_from: str | None = None  # where a damaged catalog file was moved before the rebuild


class DiskReconcile:
    """`check()` and the catalog heal, over a `DiskTier`'s root, catalog, index and lock (its attributes)."""

    # -- start-up reconciliation --------------------------------------------------------------------
    def check(self, repair: bool = True, adopt_any_age: bool = False) -> CheckReport:
        """Reconcile catalog and files, touching only what is provably dead (see the module docstring);
        `repair=False` changes nothing and reports what a repair would do."""
        try:
            return self._check(repair, adopt_any_age)
        except DAMAGE_ERRORS as err:
            raise CatalogDamaged(self.catalog.damaged(damage_reason(err))) from None

    def _check(self, repair: bool, adopt_any_age: bool) -> CheckReport:
        with self._lock:
            now = time.time()
            temps_removed, spared = self._dead_temps(repair)
            rows = self.catalog.rows()  # rows first: a row read here names a file that is already durable
            files = {p.relative_to(self.root).as_posix(): p for p in (self.root / "data").rglob("*.kv")}
            keep: dict[ChunkKey, CatalogRow] = {}
            bad: list[CatalogRow] = []
            for row in rows:
                size = file_size(files.get(row.file))
                if size is not None and size == row.info.nbytes and owns(row.info.key, row.file):
                    keep[row.info.key] = row
                else:
                    bad.append(row)
            if repair:
                for row in bad:
                    self.catalog.delete_if_file(row.info.key, row.file)
            named = {r.file for r in keep.values()}
            unnamed = [(rel, p) for rel, p in files.items() if rel not in named]
            old_enough = []
            for rel, p in unnamed:
                mtime = file_mtime(p)
                if mtime is None:
                    continue  # gone meanwhile (a concurrent eviction or replacement)
                if adopt_any_age or now - mtime >= self.grace_s:
                    old_enough.append((rel, p))
                else:
                    spared += 1
            if old_enough:
                named_now = self.catalog.files([rel for rel, _ in old_enough])  # committed since the listing
                old_enough = [(rel, p) for rel, p in old_enough if rel not in named_now]
            adopted = removed = 0
            for rel, p in old_enough:
                row = self._adoptable(rel, p, keep)
                if row is not None:
                    if not repair or self.catalog.insert_new(row):
                        keep[row.info.key] = row
                        adopted += 1
                    continue
                removed += 1
                if repair:
                    unlink_if_present(p)
            if repair:
                self._index = keep
                self._bytes = sum(r.info.nbytes for r in keep.values())
            else:
                self._index = {k: r for k, r in keep.items() if (self.root / r.file).exists()}
                self._bytes = sum(r.info.nbytes for r in self._index.values())
            return CheckReport(len(keep), removed, temps_removed, len(bad), adopted, spared, not repair)

    def _adoptable(self, rel: str, path: Path, keep: dict[ChunkKey, CatalogRow]) -> CatalogRow | None:
        """The catalog row a whole, unnamed payload file describes; None for a damaged file, one not under
        its key's name, or one superseded by a row of the same key (those are the files to delete)."""
        try:
            with open(path, "rb") as f:
                owner, p = read_any_payload(f)
            key = ChunkKey.parse(owner)
        except (OSError, CorruptPayload, ValueError) as err:
            log.warning("disk tier %r: %s is not a whole entry (%s)", self.name, rel, err)
            return None
        if key in keep or not owns(key, rel):
            return None
        size = path.stat().st_size
        info = EntryInfo(key, size, p.num_tokens, float(p.num_tokens))
        return CatalogRow(info, rel, p.enc.codec, p.checksum)

    def _dead_temps(self, repair: bool) -> tuple[int, int]:
        """Remove temp files of writers that are gone and their stale locks; counts (removed, spared because
        the writer is alive). Temps are listed before locks: a writer locks before it writes, so a temp whose
        writer has no held lock now is dead. Temp files not named after a writer count as dead past grace."""
        now = time.time()
        temps = list((self.root / "tmp").glob("*.tmp"))
        alive = {self.writer_id}
        for lock in (self.root / "locks").glob("*.lock"):
            if lock.stem != self.writer_id and lock_held(lock, release_if_free=repair):
                alive.add(lock.stem)
        removed = spared = 0
        for p in temps:
            owner = p.name.split(".", 1)[0]
            mtime = file_mtime(p)
            if mtime is None:
                continue
            if owner in alive or (not WRITER_ID.fullmatch(owner) and now - mtime < self.grace_s):
                spared += 1
                continue
            removed += 1
            if repair:
                unlink_if_present(p)
        return removed, spared

    def _move_catalog_aside(self) -> str:
        """Rename the tier's own damaged SQLite catalog (and its WAL files); the new path."""
        src = self.root / "catalog.sqlite"
        dst = self.root / f"catalog.sqlite.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{src}{suffix}").exists():
                os.replace(f"{src}{suffix}", f"{dst}{suffix}")
        log.warning("disk tier %r: damaged catalog moved to %s; rebuilding rows from payload headers", self.name, dst)
        return str(dst)


def owns(key: ChunkKey, rel: str) -> bool:
    """Whether `rel` is a payload file name `put` gives `key`: data/NAMESPACE/DIGEST.SUFFIX.kv."""
    folder, _, name = rel.rpartition("/")
    return folder == f"data/{key.namespace}" and name.startswith(f"{key.digest}.") and name.endswith(".kv")
