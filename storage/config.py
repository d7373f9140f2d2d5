"""StorageConfig: which tiers, their budgets and codecs, where the disk tier lives, which policy, and
how many worker processes decode CPU-bound codecs (cachegen: see compression/pool.py).

The settings tree (engine/settings.py) composes it; `build_store(config)` turns it into a TieredStore.
Capacities are bytes (the settings tree, engine/settings.py, reads "4GiB" with pydantic's ByteSize).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..compression import DecodePool, get_codec
from ..compression.layered import DTYPES
from ..compression.schedule import codec_with_schedule, find_schedule
from .disk import DiskTier
from .memory import MemoryTier
from .policy import POLICIES
from .redis_tier import RedisTier
from .tier import Tier
from .tiered import TieredStore

KINDS = ("gpu", "cpu", "disk", "redis")


@dataclass(frozen=True)
class TierConfig:
    """One tier: `kind` in gpu|cpu|disk|redis, a byte budget, and the codec its entries are stored with.
    A redis tier needs `url` (redis://host:port/db); its keys start with `prefix` and expire `ttl_s`
    after their last hit."""

    kind: str
    capacity_bytes: int
    codec: str = "identity"
    name: str | None = None  # defaults to `kind`
    url: str | None = None  # redis only
    prefix: str = "ragkv"  # redis only
    ttl_s: float | None = 7 * 24 * 3600.0  # redis only; None: no expiry

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tier kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        if self.kind == "redis" and not self.url:
            raise ValueError("a redis tier needs url='redis://host:port/db'")
        if self.capacity_bytes <= 0:
            raise ValueError(f"tier {self.kind!r}: capacity_bytes must be > 0, got {self.capacity_bytes}")
        get_codec(self.codec)  # an unknown codec name fails here, with the list of known ones


@dataclass(frozen=True)
class StorageConfig:
    """The whole store; tiers fastest first (at most one disk tier, last)."""

    tiers: tuple[TierConfig, ...] = field(
        default_factory=lambda: (TierConfig("cpu", 2 << 30), TierConfig("disk", 32 << 30))
    )
    disk_dir: str = ".ragkv/cache"
    catalog_url: str | None = None  # default: sqlite:///{disk_dir}/catalog.sqlite
    policy: str = "lru"  # lru | cost
    promote: bool = True
    kv_dtype: str | None = "float16"  # entries are stored in this dtype (None: as computed)
    decode_workers: int | None = None  # processes decoding CPU-bound codecs (cachegen); None: one per core, 0: none
    repair_on_open: bool = True  # False: the disk tier's opening check only counts (`cache stats`, `gc --dry-run`)
    codec_schedule: str | None = None  # `ragkv calibrate`'s schedule file, or its directory (keyed by model)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("StorageConfig needs at least one tier")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPES:
            raise ValueError(f"unknown kv_dtype {self.kv_dtype!r}; accepted: {', '.join(DTYPES)} or None")
        if self.decode_workers is not None and self.decode_workers < 0:
            raise ValueError(
                f"decode_workers must be >= 0 (0: decode inline) or None (one per core), got {self.decode_workers}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}; accepted: {', '.join(POLICIES)}")
        disks = [i for i, t in enumerate(self.tiers) if t.kind == "disk"]
        if len(disks) > 1 or (disks and disks[0] != len(self.tiers) - 1):
            raise ValueError("StorageConfig: at most one disk tier, and it must be the last (slowest)")


def build_tier(
    cfg: TierConfig, storage: StorageConfig, decode_pool: DecodePool | None = None, model_fingerprint: str | None = None
) -> Tier:
    """The tier described by `cfg` (its CPU-bound decoding done by `decode_pool` when given); a codec a
    calibrated schedule covers takes the schedule's bits for `model_fingerprint`, else its defaults."""
    name = cfg.name or cfg.kind
    dtype = DTYPES[storage.kv_dtype] if storage.kv_dtype else None
    codec = codec_with_schedule(cfg.codec, find_schedule(storage.codec_schedule, model_fingerprint))
    if cfg.kind == "disk":
        return DiskTier(
            storage.disk_dir,
            cfg.capacity_bytes,
            codec,
            storage.catalog_url,
            name=name,
            dtype=dtype,
            decode_pool=decode_pool,
            repair=storage.repair_on_open,
        )
    if cfg.kind == "redis":
        return RedisTier(
            cfg.url,
            cfg.capacity_bytes,
            codec,
            name=name,
            prefix=cfg.prefix,
            ttl_s=cfg.ttl_s,
            dtype=dtype,
            decode_pool=decode_pool,
        )
    device = "cuda" if cfg.kind == "gpu" else "cpu"
    return MemoryTier(cfg.capacity_bytes, device=device, codec=codec, name=name, dtype=dtype, decode_pool=decode_pool)


def default_decode_workers() -> int:
    """One decode process per core this process may run on; none on a single core (nothing to gain)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 else 0


def decode_workers(config: StorageConfig) -> int:
    """Worker processes the store starts: none unless a tier's codec decodes CPU-bound (cachegen);
    then `config.decode_workers`, by default `default_decode_workers()`."""
    if not any(get_codec(t.codec).parallel_decode for t in config.tiers):
        return 0
    return default_decode_workers() if config.decode_workers is None else config.decode_workers


def build_store(config: StorageConfig, model_fingerprint: str | None = None) -> TieredStore:
    """A TieredStore over the configured tiers (a disk tier reconciles its catalog on the way); with
    `config.codec_schedule`, the schedule calibrated for `model_fingerprint` sets the codec's bits."""
    workers = decode_workers(config)
    pool = DecodePool(workers) if workers else None
    try:
        tiers = [build_tier(t, config, pool, model_fingerprint) for t in config.tiers]
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    return TieredStore(tiers, policy=config.policy, promote=config.promote, decode_pool=pool)
