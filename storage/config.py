"""StorageConfig: which tiers, their budgets and codecs, where the disk tier lives, which policy, and
how many worker processes decode CPU-bound codecs (cachegen: see compression/pool.py).

`server/` composes it (reading `RAGKV_*` there); `build_store(config)` turns it into a TieredStore.
Capacities are bytes; `parse_bytes("4GiB")` reads the human form for config files and the CLI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..compression import DecodePool, get_codec
from ..compression.schedule import codec_with_schedule, find_schedule
from .disk import DiskTier
from .memory import MemoryTier
from .policy import POLICIES
from .tier import Tier
from .tiered import TieredStore

KINDS = ("gpu", "cpu", "disk")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


@dataclass(frozen=True)
class TierConfig:
    """One tier: `kind` in gpu|cpu|disk, a byte budget, and the codec its entries are stored with."""

    kind: str
    capacity_bytes: int
    codec: str = "identity"
    name: str | None = None  # defaults to `kind`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tier kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        if self.capacity_bytes <= 0:
            raise ValueError(f"tier {self.kind!r}: capacity_bytes must be > 0, got {self.capacity_bytes}")


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
    codec_schedule: str | None = None  # `ragkv calibrate`'s schedule file, or its directory (keyed by model)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("StorageConfig needs at least one tier")
        if self.kv_dtype is not None and self.kv_dtype not in _DTYPES:
            raise ValueError(f"unknown kv_dtype {self.kv_dtype!r}; accepted: {', '.join(_DTYPES)} or None")
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
    dtype = _DTYPES[storage.kv_dtype] if storage.kv_dtype else None
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


def parse_bytes(text: str | int) -> int:
    """`"4GiB"`, `"512MB"`, `"1e9"` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a byte size from {text!r}; use e.g. 4GiB, 512MB, 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
