"""build_store: a StorageConfig (storage/config.py) turned into a TieredStore: its tiers with their
codecs (a calibrated schedule's bits where one covers the model) and, for CPU-bound codecs, the
DecodePool their layers are decoded in."""

from __future__ import annotations

import os

from ..compression import DecodePool, get_codec
from ..compression.layered import DTYPES
from ..compression.schedule import codec_with_schedule, find_schedule
from .config import StorageConfig, TierConfig
from .disk import DiskTier
from .memory import MemoryTier
from .redis_tier import RedisTier
from .tier import Tier
from .tiered import TieredStore


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
