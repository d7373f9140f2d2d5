"""DiskTier: one checksummed payload file per entry under a root directory, plus a SQL catalog.

Writes are crash-safe: payload to a temp file, fsync, rename to a fresh name, fsync the directory,
then the catalog row; the in-memory index (what `lookup` reads) changes only after the commit.

Several processes may share one tier directory. Each holds an exclusive `flock` on its own file in
`locks/` for its lifetime and names its temp files after it. `check()` (run at open) touches only
what is provably dead: temp files of writers whose lock is free; rows whose file is gone or has the
wrong size, deleted only while they still name that file; payload files no row names that are older
than `grace_s`: a whole file is adopted back into the catalog from its header (key, codec, checksum),
only a damaged or superseded one is deleted. So a damaged catalog loses no healthy payload, and a
catalog that does not read back is healed (the tier's own SQLite file: moved aside and rebuilt from
the headers) or reported with how to heal it. `repair=False` only counts (`gc --dry-run`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import Codec, DecodePool, get_codec
from .catalog import Catalog, CatalogDamaged, CatalogRow
from .disk_check import GRACE_S, DiskReconcile, owns
from .files import fsync_dir, hold_lock, unlink_if_present
from .layered import EncodedLayers, FileLayers
from .payload import CorruptPayload, Header, pack_header, read_header, read_payload
from .tier import EntryInfo, Tier, TierWriteError, resolve_codec

log = logging.getLogger(__name__)
_FLUSH_EVERY = 256  # persist hits/recency after this many touched entries


class DiskTier(DiskReconcile, Tier):
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
        grace_s: float = GRACE_S,
        repair: bool = True,
        layer_reads: bool = True,
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
        self.grace_s = grace_s
        self.layer_reads = layer_reads  # `get` reads the header only; each layer is read and checked when asked
        try:
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            (self.root / "locks").mkdir(exist_ok=True)
        except OSError as err:
            raise TierWriteError(f"disk tier {name!r}: cannot create {self.root}: {err}") from err
        self.writer_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._writer_lock = hold_lock(self.root / "locks" / f"{self.writer_id}.lock")
        self._index: dict[ChunkKey, CatalogRow] = {}
        self._bytes = 0
        self._dirty: set[ChunkKey] = set()
        self._lock = threading.RLock()
        url = catalog_url or f"sqlite:///{self.root / 'catalog.sqlite'}"
        self.catalog: Catalog | None = None
        try:
            try:
                self.catalog = Catalog(url, name)
                self.last_check = self.check(repair=repair)
            except CatalogDamaged:
                if catalog_url is not None or not repair:
                    raise  # a shared catalog (documents too) is never moved aside here: the message says how
                if self.catalog is not None:
                    self.catalog.close()
                healed_from = self._move_catalog_aside()
                self.catalog = Catalog(url, name)
                self.last_check = replace(self.check(adopt_any_age=True), healed_from=healed_from)
        except BaseException:
            if self.catalog is not None:
                self.catalog.close()
            self._release_lock()
            raise

    # -- reads: cheap bookkeeping, then I/O outside the lock -----------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, key: ChunkKey) -> bool:
        return key in self._index

    def info(self, key: ChunkKey) -> EntryInfo | None:
        row = self._index.get(key)
        return None if row is None else row.info

    @property
    def catalog_url(self) -> str:
        return self.catalog.url

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
        """The entry, its header verified. With `layer_reads` (and a layered payload whose digest covers the
        header) nothing else is read here: `FileLayers` reads each layer's section when asked and checks its
        CRC32 then (a bad one drops the entry); otherwise the whole payload is read and verified now."""
        row = self._index.get(key)
        if row is None:
            return None
        target = torch.device(device) if device is not None else self.device
        try:
            fd = os.open(self.root / row.file, os.O_RDONLY)
        except FileNotFoundError:
            return self._vanished(key, row, device)
        except OSError as err:
            return self._corrupt(key, row, f"unreadable: {err}")
        try:
            with open(fd, "rb", closefd=False) as f:
                head = read_header(f)
                lazy = self.layer_reads and head.by_header
                if not lazy:
                    f.seek(0)
                    p = read_payload(f, key, row.checksum)
            codec = self.codec if head.codec == self.codec.name else get_codec(head.codec)
            if lazy:
                self._check_header(key, row, head, os.fstat(fd).st_size)
                layers = FileLayers(
                    fd,
                    head.payload_offset,
                    head.codec,
                    head.meta,
                    codec,
                    head.pos0,
                    head.num_tokens,
                    head.num_layers,
                    target,
                    self.decode_pool,
                    lambda why: self._corrupt(key, row, why),
                )
                fd = None  # the view owns it now
                return layers
        except (CorruptPayload, ValueError) as err:
            return self._corrupt(key, row, str(err))
        finally:
            if fd is not None:
                os.close(fd)
        return EncodedLayers(p.enc, codec, p.pos0, p.num_tokens, p.num_layers, target, self.decode_pool)

    @staticmethod
    def _check_header(key: ChunkKey, row: CatalogRow, head: Header, file_size: int) -> None:
        """What `read_payload` checks besides the payload bytes: the owner, the catalog's checksum, the size."""
        if head.key != str(key):
            raise CorruptPayload(f"payload belongs to {head.key!r}, not {key}")
        if head.checksum != row.checksum:
            raise CorruptPayload("checksum differs from the catalog's")
        if file_size != head.payload_offset + head.payload_len:
            raise CorruptPayload(f"file is {file_size} bytes; its header says {head.payload_offset + head.payload_len}")

    def _corrupt(self, key: ChunkKey, row: CatalogRow, why: str) -> None:
        """Drop a damaged entry (still the one `row` names) so it is recomputed, never served; a miss."""
        log.warning("disk tier %r: dropping corrupt entry %s (%s)", self.name, key, why)
        with self._lock:
            if self._index.get(key) is row:
                self.count_corrupt(key)
                self._drop(key)
        return None

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
            unlink_if_present(self.root / rel)
            raise TierWriteError(f"disk tier {self.name!r}: catalog write for {key} failed: {err}") from err
        with self._lock:
            old = self._index.get(key)
            self._index[key] = row
            self._bytes += size - (old.info.nbytes if old else 0)
        if old is not None:
            unlink_if_present(self.root / old.file)
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
        try:
            self.flush()
        finally:
            self.catalog.close()
            self._release_lock()

    def clear(self) -> None:
        """Drop every entry (files and rows)."""
        with self._lock:
            for key in list(self._index):
                self._drop(key)

    def _vanished(self, key: ChunkKey, row: CatalogRow, device) -> LayeredKV | None:
        """The file of `row` is gone (another process replaced or evicted the entry): follow the
        catalog's current row for `key` if it names another file, else forget the entry. A miss."""
        try:
            current = self.catalog.row(key)
        except Exception as err:  # noqa: BLE001 - the catalog is down: treat as a plain miss
            log.warning("disk tier %r: catalog read for %s failed: %s", self.name, key, err)
            return None
        with self._lock:
            if self._index.get(key) is not row:
                return None
            if current is not None and current.file != row.file and (self.root / current.file).exists():
                self._index[key] = current
                self._bytes += current.info.nbytes - row.info.nbytes
                return self.get(key, device)
            self._index.pop(key, None)
            self._bytes -= row.info.nbytes
            self._dirty.discard(key)
        self.catalog.delete_if_file(key, row.file)
        return None

    def _release_lock(self) -> None:
        fd, self._writer_lock = self._writer_lock, None
        if fd is not None:
            unlink_if_present(self.root / "locks" / f"{self.writer_id}.lock")
            os.close(fd)

    # -- internals ----------------------------------------------------------------------------------
    def _write_file(self, key: ChunkKey, rel: str, header: bytes, payload: bytes) -> None:
        """temp file -> fsync -> rename -> fsync dir; any OSError leaves no file and names the cause."""
        tmp = self.root / "tmp" / f"{self.writer_id}.{uuid.uuid4().hex}.tmp"
        final = self.root / rel
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as err:
            unlink_if_present(tmp)
            unlink_if_present(final)
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
        # row first (a crash now leaves an orphan file, never a dangling row), and only while it names the file
        # this process knows: a newer version another process committed stays; only a file under this key's
        # own name is deleted, never one a damaged row points at
        self.catalog.delete_if_file(key, row.file)
        if owns(key, row.file):
            unlink_if_present(self.root / row.file)
        return True
