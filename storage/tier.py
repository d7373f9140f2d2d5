"""The `Tier` interface: one place chunk KV bytes can live (GPU, CPU, disk, remote).

`lookup` and `info` are cheap and side-effect free (no I/O, no recency update); `get`/`put`/`remove`
do the I/O. `get` returns a `LayeredKV` that may decode one layer at a time. A miss is `None`,
never an exception; a write that cannot be done raises `TierWriteError` and keeps existing entries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import Codec, get_codec
from .entry import EntryInfo


class TierWriteError(RuntimeError):
    """A tier could not store an entry (full disk, unwritable directory, catalog down)."""


def resolve_codec(codec: str | Codec) -> Codec:
    """A codec instance from a name or an instance."""
    return get_codec(codec) if isinstance(codec, str) else codec


class Tier(ABC):
    """One storage tier with a byte budget; the `TieredStore` decides what to evict."""

    name: str
    capacity_bytes: int
    codec: Codec
    device: torch.device  # where `get` decodes to by default
    corrupt: int = 0  # entries found corrupt on read (dropped, never served)
    shared: bool = False  # other processes read this tier (Redis): the store writes every put through to it

    def count_corrupt(self, key: ChunkKey) -> None:
        """Record one entry dropped as corrupt: in `corrupt` and under its namespace (`corrupt_in`)."""
        self.corrupt += 1
        by_namespace = self.__dict__.setdefault("_corrupt_by_namespace", {})
        by_namespace[key.namespace] = by_namespace.get(key.namespace, 0) + 1

    def corrupt_in(self, namespace: str) -> int:
        """Entries of `namespace` dropped as corrupt here."""
        return self.__dict__.get("_corrupt_by_namespace", {}).get(namespace, 0)

    @abstractmethod
    def lookup(self, key: ChunkKey) -> bool:
        """Whether `key` is here, without I/O or side effects."""

    @abstractmethod
    def info(self, key: ChunkKey) -> EntryInfo | None:
        """The entry's bookkeeping (mutable, owned by the tier), without I/O."""

    @abstractmethod
    def infos(self) -> list[EntryInfo]:
        """Bookkeeping of every entry (a snapshot list)."""

    @abstractmethod
    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> LayeredKV | None:
        """The entry, readable layer by layer on `device`, or None (missing or corrupt)."""

    @abstractmethod
    def put(self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, hits: int = 0) -> EntryInfo:
        """Store (or replace) an entry through this tier's codec; raises TierWriteError if it cannot."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> bool:
        """Drop an entry; True if it was there."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by all entries."""

    def keys(self) -> list[ChunkKey]:
        """Every key held here."""
        return [i.key for i in self.infos()]

    @property
    def catalog_url(self) -> str | None:
        """The URL of this tier's SQL catalog database (the store keeps chunk metadata there); None
        for a tier without one."""
        return None

    def status(self) -> dict | None:
        """The health of a remote tier's link (up, outages, last_error, ...); None for a local tier,
        which has no link that can go down."""
        return None

    def touched(self, key: ChunkKey) -> None:
        """The store changed this entry's hits/recency/priority; persistent tiers note it for `flush`."""

    def flush(self) -> None:
        """Persist bookkeeping (hits, recency); a no-op for memory tiers."""

    def close(self) -> None:
        """Flush and release resources."""
        self.flush()

    def __len__(self) -> int:
        return len(self.infos())
