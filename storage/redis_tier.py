"""RedisTier: chunk KV shared by every sidecar through one Redis (or Valkey), encoded by any codec.

Layout of one entry (all keys of a chunk share the Redis Cluster hash tag `{namespace/digest}`, so
they live on one shard and one pipeline reads them):

    {prefix}:{ns/digest}:h      header: MAGIC | JSON (key, codec, meta, pos0, T, L, part sizes, a
                                SHA-256 per part) | SHA-256 of the JSON
    {prefix}:{ns/digest}:p{i}   part i: layer i's section of the codec payload (one key per layer),
                                or the whole payload for a codec without per-layer offsets
    {prefix}:{ns/digest}:n      precomputes of the entry by any sidecar (storage/lease.py; deleted
                                with the entry)
    {prefix}:{ns/digest}:lease  the compute lease, while a sidecar computes the entry

A read is two pipelined round trips (header, then every part + a TTL refresh) and verifies every
checksum; a missing part (Redis evicted it under `maxmemory`) or a bad checksum is a miss, and the
entry's keys are deleted. Writes are one MULTI/EXEC, so readers see a whole entry or none. Every key
carries a TTL (`ttl_s`, refreshed on each hit). Layers decode lazily from the verified bytes through
`EncodedLayers` (with a DecodePool, prefetched ahead of the blend loop like the disk tier).

`lookup` asks Redis (EXISTS on the header): an entry written by another sidecar is a hit here. The
tier's own bookkeeping (`infos`, `nbytes`, the store's eviction policy) covers the entries this
process wrote or read; Redis's `maxmemory` policy bounds the shared total. An unreachable Redis
(see RedisLink) makes every read a miss and every write a TierWriteError, never an exception
elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading

import torch

from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV
from ..compression import Codec, DecodePool, EncodedKV, get_codec
from .layered import EncodedLayers
from .redis_link import RedisLink
from .tier import EntryInfo, Tier, TierWriteError, resolve_codec

log = logging.getLogger(__name__)
MAGIC = b"RAGKVRD1"
_LEN = struct.Struct("<I")
_DIGEST = 32


class RedisTier(Tier):
    """Entries in Redis at `url` under `prefix`, each key expiring `ttl_s` after its last hit."""

    shared = True  # every sidecar reads it: the store writes each put through to it

    def __init__(
        self,
        url: str | RedisLink,
        capacity_bytes: int = 64 << 30,
        codec: str | Codec = "cachegen",
        name: str = "redis",
        prefix: str = "ragkv",
        ttl_s: float | None = 7 * 24 * 3600.0,
        dtype: torch.dtype | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 seconds or None (no expiry), got {ttl_s}")
        if not prefix or any(c in prefix for c in "{} "):
            raise ValueError(f"Redis key prefix must be non-empty without braces or spaces, got {prefix!r}")
        self.link = url if isinstance(url, RedisLink) else RedisLink(url)
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.codec = resolve_codec(codec)
        self.prefix = prefix
        self.ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self.dtype = dtype
        self.decode_pool = decode_pool
        self.device = torch.device("cpu")
        self.corrupt = 0
        self.incomplete = 0  # entries with a part evicted by Redis (a miss, keys deleted)
        self._index: dict[ChunkKey, tuple[EntryInfo, int]] = {}  # entries this process wrote or read: info, parts
        self._bytes = 0
        self._lock = threading.Lock()

    # -- key names ---------------------------------------------------------------------------------
    def slot(self, key: ChunkKey) -> str:
        """The common stem of the entry's keys (its cluster hash tag is `{namespace/digest}`)."""
        return f"{self.prefix}:{{{key.namespace}/{key.digest}}}"

    def header_key(self, key: ChunkKey) -> str:
        return self.slot(key) + ":h"

    def part_key(self, key: ChunkKey, i: int) -> str:
        return f"{self.slot(key)}:p{i}"

    def count_key(self, key: ChunkKey) -> str:
        """How many times sidecars precomputed the entry (storage/lease.py); deleted with the entry."""
        return self.slot(key) + ":n"

    # -- bookkeeping --------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, key: ChunkKey) -> bool:
        """Whether Redis holds the entry's header now (one EXISTS; False while Redis is down)."""
        return bool(self.link.call(lambda r: r.exists(self.header_key(key)), 0))

    def info(self, key: ChunkKey) -> EntryInfo | None:
        entry = self._index.get(key)
        return None if entry is None else entry[0]

    def infos(self) -> list[EntryInfo]:
        with self._lock:
            return [info for info, _ in self._index.values()]

    def status(self) -> dict:
        """The link's health and what reads found wrong (the store's services add the compute leases)."""
        return {**self.link.status(), "corrupt": self.corrupt, "incomplete": self.incomplete}

    # -- reads ----------------------------------------------------------------------------------------
    def get(self, key: ChunkKey, device: torch.device | str | None = None) -> LayeredKV | None:
        raw = self.link.call(lambda r: r.get(self.header_key(key)), None)
        if raw is None:
            return self._forget(key)
        try:
            head = _read_header(raw, key)
            sizes, digests = head["sizes"], head["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            return self._corrupt(key, 0, err)  # parts left unnamed expire with their TTL
        parts = self.link.call(lambda r: self._read_parts(r, key, len(sizes)), None)
        if parts is None:
            return None  # Redis went away between the two round trips
        for i, (part, size, digest) in enumerate(zip(parts, sizes, digests)):
            if part is None:
                self.incomplete += 1
                log.info("redis tier %r: %s lost part %d to eviction; dropping it", self.name, key, i)
                self._delete(key, len(sizes))
                return None
            if len(part) != size or hashlib.sha256(part).hexdigest() != digest:
                return self._corrupt(key, len(sizes), ValueError(f"part {i} fails its size or SHA-256 check"))
        enc = EncodedKV(head["codec"], b"".join(parts), head["meta"])
        codec = self.codec if enc.codec == self.codec.name else get_codec(enc.codec)
        nbytes = len(raw) + sum(sizes)
        with self._lock:
            old = self._index.get(key)
            info = old[0] if old else EntryInfo(key, nbytes, int(head["num_tokens"]), float(head["cost"]))
            info.nbytes = nbytes
            self._index[key] = (info, len(sizes))
            self._bytes += nbytes - (old[0].nbytes if old else 0)
        target = torch.device(device) if device is not None else self.device
        num_layers = int(head["num_layers"])
        return EncodedLayers(
            enc, codec, int(head["pos0"]), int(head["num_tokens"]), num_layers, target, self.decode_pool
        )

    def _read_parts(self, r, key: ChunkKey, n: int) -> list[bytes | None]:
        pipe = r.pipeline(transaction=False)
        names = [self.part_key(key, i) for i in range(n)]
        pipe.mget(names)
        if self.ttl_ms is not None:  # a hit keeps the entry alive for another TTL
            for name in [self.header_key(key), *names]:
                pipe.pexpire(name, self.ttl_ms)
        return pipe.execute()[0]

    # -- writes ----------------------------------------------------------------------------------------
    def put(self, key: ChunkKey, kv: ChunkKV, cost: float | None = None, hits: int = 0) -> EntryInfo:
        kv = kv if self.dtype is None else kv.to(dtype=self.dtype)
        enc = self.codec.encode(kv)
        parts = _split(enc)
        cost = float(kv.num_tokens if cost is None else cost)
        header = _pack_header(key, enc, kv, parts, cost)
        old_parts = self._index.get(key, (None, 0))[1]

        def write(r) -> bool:
            pipe = r.pipeline(transaction=True)
            for i, part in enumerate(parts):
                pipe.set(self.part_key(key, i), part, px=self.ttl_ms)
            for i in range(len(parts), old_parts):  # a replaced entry with more parts leaves none behind
                pipe.delete(self.part_key(key, i))
            pipe.set(self.header_key(key), header, px=self.ttl_ms)
            pipe.execute()
            return True

        if not self.link.call(write, False):  # unreachable, or refused (OOM under a noeviction policy)
            raise TierWriteError(f"redis tier {self.name!r}: {key} not stored ({self.link.last_error})")
        size = len(header) + sum(len(p) for p in parts)
        info = EntryInfo(key, size, kv.num_tokens, cost, hits)
        with self._lock:
            old = self._index.get(key)
            self._index[key] = (info, len(parts))
            self._bytes += size - (old[0].nbytes if old else 0)
        return info

    def remove(self, key: ChunkKey) -> bool:
        """Delete the entry from Redis (for every sidecar); True if Redis held it."""
        entry = self._index.get(key)
        parts = entry[1] if entry else self._parts_in_redis(key)
        self._forget(key)
        return self._delete(key, parts) > 0

    def clear(self) -> int:
        """Delete every key under this tier's prefix (all namespaces); returns how many."""

        def scan_delete(r) -> int:
            n = 0
            for batch in _batched(r.scan_iter(match=f"{self.prefix}:{{*", count=500), 500):
                n += r.delete(*batch)
            return n

        with self._lock:
            self._index.clear()
            self._bytes = 0
        return self.link.call(scan_delete, 0)

    def close(self) -> None:
        self.link.close()

    # -- internals ----------------------------------------------------------------------------------
    def _parts_in_redis(self, key: ChunkKey) -> int:
        raw = self.link.call(lambda r: r.get(self.header_key(key)), None)
        if raw is None:
            return 0
        try:
            return len(_read_header(raw, key)["sizes"])
        except (ValueError, KeyError, TypeError):
            return 0

    def _delete(self, key: ChunkKey, parts: int) -> int:
        """Delete the entry's keys and its precompute count (a recompute of a dropped entry is no
        duplicate); how many of the entry's own keys Redis held."""
        names = [self.header_key(key), *(self.part_key(key, i) for i in range(parts))]

        def go(r) -> int:
            pipe = r.pipeline(transaction=False)
            pipe.delete(*names)
            pipe.delete(self.count_key(key))
            return pipe.execute()[0]

        return int(self.link.call(go, 0))

    def _forget(self, key: ChunkKey) -> None:
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is not None:
                self._bytes -= entry[0].nbytes

    def _corrupt(self, key: ChunkKey, parts: int, err: Exception) -> None:
        log.warning("redis tier %r: dropping corrupt entry %s (%s)", self.name, key, err)
        self.count_corrupt(key)
        self._forget(key)
        self._delete(key, parts)


def _split(enc: EncodedKV) -> list[bytes]:
    """The payload cut at the codec's per-layer offsets (one part per layer), else one part."""
    offsets = enc.meta.get("offsets") if isinstance(enc.meta, dict) else None
    if not offsets or offsets[0] != 0 or offsets[-1] != len(enc.payload) or len(offsets) < 2:
        return [bytes(enc.payload)]
    view = memoryview(enc.payload)
    return [bytes(view[a:b]) for a, b in zip(offsets, offsets[1:])]


def _pack_header(key: ChunkKey, enc: EncodedKV, kv: ChunkKV, parts: list[bytes], cost: float) -> bytes:
    head = {
        "key": str(key),
        "codec": enc.codec,
        "meta": enc.meta,
        "pos0": kv.pos0,
        "num_tokens": kv.num_tokens,
        "num_layers": kv.num_layers,
        "cost": cost,
        "sizes": [len(p) for p in parts],
        "sha256": [hashlib.sha256(p).hexdigest() for p in parts],
    }
    body = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(body)) + body + hashlib.sha256(body).digest()


def _read_header(raw: bytes, key: ChunkKey) -> dict:
    """The verified header JSON of `key`'s entry; ValueError saying what did not match."""
    start = len(MAGIC) + _LEN.size
    if len(raw) < start or raw[: len(MAGIC)] != MAGIC:
        raise ValueError("not a ragkv Redis header (bad magic or truncated)")
    (n,) = _LEN.unpack(raw[len(MAGIC) : start])
    body, digest = raw[start : start + n], raw[start + n :]
    if len(body) != n or len(digest) != _DIGEST or hashlib.sha256(body).digest() != digest:
        raise ValueError("header checksum mismatch or truncated header")
    head = json.loads(body)
    if head.get("key") != str(key):
        raise ValueError(f"header belongs to {head.get('key')!r}, not {key}")
    if len(head["sizes"]) != len(head["sha256"]):
        raise ValueError("header lists a different number of part sizes and checksums")
    return head


def _batched(it, n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
