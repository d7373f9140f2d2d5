"""MemoryTier: chunk KV held in process memory, on the CPU (pinned when CUDA is present) or a GPU.

With the identity codec an entry is kept as tensors on the tier's device (a hit costs no decode);
with any other codec it is kept as the codec's bytes (in host memory: the Codec interface holds
`bytes`) and decoded layer by layer to the requested device. Eviction is the TieredStore's job.
"""

from __future__ import annotations

import threading

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import Codec, DecodePool, EncodedKV
from .layered import EncodedLayers, ResidentKV
from .tier import EntryInfo, Tier, resolve_codec


class MemoryTier(Tier):
    """Entries in memory on `device` (cast to `dtype` if given), within `capacity_bytes` (the store enforces it)."""

    def __init__(
        self,
        capacity_bytes: int = 4 << 30,
        device: str | torch.device = "cpu",
        codec: str | Codec = "identity",
        name: str | None = None,
        pin: bool | None = None,
        dtype: torch.dtype | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"memory tier on {self.device} needs CUDA, which is not available; use device='cpu'")
        self.capacity_bytes = capacity_bytes
        self.dtype = dtype  # entries are cast to this dtype on put (None: keep theirs)
        self.codec = resolve_codec(codec)
        self.decode_pool = decode_pool  # decodes layers of CPU-bound codecs in worker processes
        self.name = name or ("gpu" if self.device.type == "cuda" else "cpu")
        self.pin = (self.device.type == "cpu" and torch.cuda.is_available()) if pin is None else pin
        self.corrupt = 0
        self._raw = self.codec.name == "identity"
        self._entries: dict[ChunkKey, tuple[ChunkKV | EncodedKV, int, int, int]] = {}  # data, pos0, T, L
        self._info: dict[ChunkKey, EntryInfo] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, key: ChunkKey) -> bool:
        return key in self._info

    def info(self, key: ChunkKey) -> EntryInfo | None:
        return self._info.get(key)

    def infos(self) -> list[EntryInfo]:
        with self._lock:
            return list(self._info.values())

    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> LayeredKV | None:
        target = torch.device(device) if device is not None else self.device
        entry = self._entries.get(key)
        if entry is None:
            return None
        data, pos0, num_tokens, num_layers = entry
        if isinstance(data, ChunkKV):
            return data if _same_device(data.device, target) else ResidentKV(data, target)
        return EncodedLayers(data, self.codec, pos0, num_tokens, num_layers, target, self.decode_pool)

    def put(self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, hits: int = 0) -> EntryInfo:
        kv = kv if self.dtype is None else kv.to(dtype=self.dtype)
        if self._raw:
            # a private copy (callers may reuse their tensor), pinned when a GPU will read it
            buf = torch.empty(kv.kv.shape, dtype=kv.dtype, device=self.device, pin_memory=self.pin)  # [2, L, T, H, D]
            data: ChunkKV | EncodedKV = ChunkKV(buf.copy_(kv.kv), kv.pos0)
            size = data.nbytes
        else:
            data = self.codec.encode(kv)
            size = data.nbytes
        info = EntryInfo(key, size, kv.num_tokens, float(kv.num_tokens if cost is None else cost), hits)
        with self._lock:
            self._drop(key)
            self._entries[key] = (data, kv.pos0, kv.num_tokens, kv.num_layers)
            self._info[key] = info
            self._bytes += size
        return info

    def remove(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._drop(key)

    def _drop(self, key: ChunkKey) -> bool:
        info = self._info.pop(key, None)
        if info is None:
            return False
        del self._entries[key]
        self._bytes -= info.nbytes
        return True


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)
