"""DiskTier: one checksummed payload file per entry under a root directory, plus a SQL catalog.

Writes are crash-safe: payload to a temp file, fsync, rename to a fresh name, fsync the directory,
then the catalog row; the in-memory index (what `lookup` reads) changes only after the commit.
`check()` (run at start) removes orphan and temp files and drops rows whose file is gone or has the
wrong size, so the tier survives a restart (or a crash at any step) with only whole entries visible.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import Codec, DecodePool, get_codec
from .catalog import Catalog, CatalogRow
from .layered import EncodedLayers
from .payload import CorruptPayload, pack_header, read_payload
from .tier import EntryInfo, Tier, TierWriteError, resolve_codec

log = logging.getLogger(__name__)
_FLUSH_EVERY = 256  # persist hits/recency after this many touched entries


@dataclass(frozen=True)
class CheckReport:
    """What `DiskTier.check()` repaired."""

    entries: int
    orphan_files_removed: int
    temp_files_removed: int
    rows_dropped: int


class DiskTier(Tier):
    """Entries as files under `root`; the catalog at `catalog_url` (default: `root/catalog.sqlite`)."""

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int = 64 << 30,
        codec: str | Codec = "identity",
        catalog_url: str | None = None,
        name: str = "disk",
        dtype: torch.dtype | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.root = Path(root)
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.dtype = dtype  # entries are cast to this dtype before encoding (None: keep theirs)
        self.codec = resolve_codec(codec)
        self.decode_pool = decode_pool  # decodes layers of CPU-bound codecs in worker processes
        self.device = torch.device("cpu")
        self.corrupt = 0
        try:
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as err:
            raise TierWriteError(f"disk tier {name!r}: cannot create {self.root}: {err}") from err
        self.catalog = Catalog(catalog_url or f"sqlite:///{self.root / 'catalog.sqlite'}", name)
        self._index: dict[ChunkKey, CatalogRow] = {}
        self._bytes = 0
        self._dirty: set[ChunkKey] = set()
        self._lock = threading.RLock()
        self.last_check = self.check()

    # -- reads: cheap bookkeeping, then I/O outside the lock -----------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, key: ChunkKey) -> bool:
        return key in self._index

    def info(self, key: ChunkKey) -> EntryInfo | None:
        row = self._index.get(key)
        return None if row is None else row.info

    def touched(self, key: ChunkKey) -> None:
        with self._lock:
            self._dirty.add(key)
            due = len(self._dirty) >= _FLUSH_EVERY
        if due:
            self.flush()

    def infos(self) -> list[EntryInfo]:
        with self._lock:
            return [r.info for r in self._index.values()]

    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> LayeredKV | None:
        row = self._index.get(key)
        if row is None:
            return None
        try:
            with open(self.root / row.file, "rb") as f:
                p = read_payload(f, key, row.checksum)
            codec = self.codec if p.enc.codec == self.codec.name else get_codec(p.enc.codec)
        except FileNotFoundError:
            return None  # removed by a concurrent eviction: a plain miss
        except (CorruptPayload, ValueError) as err:
            log.warning("disk tier %r: dropping corrupt entry %s (%s)", self.name, key, err)
            with self._lock:
                if self._index.get(key) is row:
                    self.corrupt += 1
                    self._drop(key)
            return None
        target = torch.device(device) if device is not None else self.device
        return EncodedLayers(p.enc, codec, p.pos0, p.num_tokens, p.num_layers, target, self.decode_pool)

    # -- writes ----------------------------------------------------------------------------------
    def put(self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, hits: int = 0) -> EntryInfo:
        kv = kv if self.dtype is None else kv.to(dtype=self.dtype)
        enc = self.codec.encode(kv)
        header, checksum = pack_header(key, enc, kv.pos0, kv.num_tokens, kv.num_layers)
        rel = f"data/{key.namespace}/{key.digest}.{uuid.uuid4().hex[:12]}.kv"
        self._write_file(key, rel, header, enc.payload)
        size = len(header) + len(enc.payload)
        info = EntryInfo(key, size, kv.num_tokens, float(kv.num_tokens if cost is None else cost), hits)
        row = CatalogRow(info, rel, enc.codec, checksum)
        try:
            self.catalog.upsert(row)
        except Exception as err:  # catalog down or full: the new file must not linger
            _unlink(self.root / rel)
            raise TierWriteError(f"disk tier {self.name!r}: catalog write for {key} failed: {err}") from err
        with self._lock:
            old = self._index.get(key)
            self._index[key] = row
            self._bytes += size - (old.info.nbytes if old else 0)
        if old is not None:
            _unlink(self.root / old.file)
        return info

    def remove(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._drop(key)

    def flush(self) -> None:
        with self._lock:
            infos = [self._index[k].info for k in self._dirty if k in self._index]
            self._dirty.clear()
        self.catalog.update_access(infos)

    def close(self) -> None:
        self.flush()
        self.catalog.close()

    def clear(self) -> None:
        """Drop every entry (files and rows)."""
        with self._lock:
            for key in list(self._index):
                self._drop(key)

    # -- start-up reconciliation --------------------------------------------------------------------
    def check(self) -> CheckReport:
        """Reconcile catalog and files: remove orphans and temp files, drop rows without a whole file."""
        with self._lock:
            temps = [p for p in (self.root / "tmp").iterdir() if p.is_file()]
            for p in temps:
                _unlink(p)
            files = {p.relative_to(self.root).as_posix(): p for p in (self.root / "data").rglob("*.kv")}
            keep: dict[ChunkKey, CatalogRow] = {}
            bad: list[ChunkKey] = []
            for row in self.catalog.rows():
                path = files.get(row.file)
                if path is not None and path.stat().st_size == row.info.nbytes:
                    keep[row.info.key] = row
                else:
                    bad.append(row.info.key)
            self.catalog.delete(bad)
            wanted = {r.file for r in keep.values()}
            orphans = [p for rel, p in files.items() if rel not in wanted]
            for p in orphans:
                _unlink(p)
            self._index = keep
            self._bytes = sum(r.info.nbytes for r in keep.values())
            return CheckReport(len(keep), len(orphans), len(temps), len(bad))

    # -- internals ----------------------------------------------------------------------------------
    def _write_file(self, key: ChunkKey, rel: str, header: bytes, payload: bytes) -> None:
        """temp file -> fsync -> rename -> fsync dir; any OSError leaves no file and names the cause."""
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.tmp"
        final = self.root / rel
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as err:
            _unlink(tmp)
            _unlink(final)
            why = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only"}
            raise TierWriteError(
                f"disk tier {self.name!r} could not write {key} under {self.root}: "
                f"{why.get(err.errno, 'I/O error')} ({err}); existing entries are kept"
            ) from err

    def _drop(self, key: ChunkKey) -> bool:
        row = self._index.pop(key, None)
        if row is None:
            return False
        self._bytes -= row.info.nbytes
        self._dirty.discard(key)
        self.catalog.delete([key])  # row first: a crash now leaves an orphan file, never a dangling row
        _unlink(self.root / row.file)
        return True


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
