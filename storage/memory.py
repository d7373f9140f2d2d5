"""MemoryTier: chunk KV held in process memory (CPU, or a CUDA device), LRU within a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from ..chunk_cache import ChunkKey, ChunkKV
from .tier import Tier


class MemoryTier(Tier):
    """Entries as tensors on `device`, stored in `dtype`, evicted least-recently-used past `capacity_bytes`."""

    def __init__(
        self,
        capacity_bytes: int = 4 << 30,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float16,
        name: str | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity_bytes = capacity_bytes
        self.name = name or ("gpu" if self.device.type == "cuda" else "cpu")
        self._entries: OrderedDict[ChunkKey, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, key: ChunkKey) -> bool:
        return key in self._entries

    def get(self, key: ChunkKey) -> ChunkKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is not None:
                self._entries.move_to_end(key)
            return kv

    def put(self, key: ChunkKey, kv: ChunkKV) -> None:
        stored = kv.to(self.device, self.dtype)
        if stored.nbytes > self.capacity_bytes:
            raise ValueError(
                f"entry of {stored.nbytes} bytes does not fit tier {self.name!r} of {self.capacity_bytes} bytes"
            )
        with self._lock:
            self._drop(key)
            while self._bytes + stored.nbytes > self.capacity_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = stored
            self._bytes += stored.nbytes

    def remove(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._drop(key)

    def keys(self) -> Iterator[ChunkKey]:
        return iter(list(self._entries))

    def _drop(self, key: ChunkKey) -> bool:
        kv = self._entries.pop(key, None)
        if kv is None:
            return False
        self._bytes -= kv.nbytes
        return True
