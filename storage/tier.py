"""The `Tier` interface: one place chunk KV bytes can live (GPU, CPU, disk, remote).

`lookup` is cheap and side-effect free (no I/O, no LRU touch); `get`/`put`/`remove` do the I/O.
A miss is `None`, never an exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..chunk_cache import ChunkKey, ChunkKV


class Tier(ABC):
    """One storage tier."""

    name: str

    @abstractmethod
    def lookup(self, key: ChunkKey) -> bool:
        """Whether `key` is here, without I/O or side effects."""

    @abstractmethod
    def get(self, key: ChunkKey) -> ChunkKV | None:
        """The entry, or None on a miss."""

    @abstractmethod
    def put(self, key: ChunkKey, kv: ChunkKV) -> None:
        """Store (or replace) an entry."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> bool:
        """Drop an entry; True if it was there."""

    @abstractmethod
    def keys(self) -> Iterator[ChunkKey]:
        """Every key held here."""

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())
