"""StorageConfig: which tiers, their budgets and codecs, where the disk tier lives, which policy, and
how many worker processes decode CPU-bound codecs (cachegen: see compression/pool.py).

The settings tree (engine/settings.py) composes it; `build_store(config)` (storage/build.py) turns it
into a TieredStore. Capacities are bytes (the settings tree, engine/settings.py, reads "4GiB" with
pydantic's ByteSize). This module imports no torch: `ragkv config` checks a configuration with it
(names from compression/names.py and storage/policy.py) without loading a tier or a codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compression.names import DTYPE_NAMES, parse_codec_name
from .policy import POLICIES

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
        parse_codec_name(self.codec)  # an unknown codec name fails here, with the list of known ones


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
        if self.kv_dtype is not None and self.kv_dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown kv_dtype {self.kv_dtype!r}; accepted: {', '.join(DTYPE_NAMES)} or None")
        if self.decode_workers is not None and self.decode_workers < 0:
            raise ValueError(
                f"decode_workers must be >= 0 (0: decode inline) or None (one per core), got {self.decode_workers}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}; accepted: {', '.join(POLICIES)}")
        disks = [i for i, t in enumerate(self.tiers) if t.kind == "disk"]
        if len(disks) > 1 or (disks and disks[0] != len(self.tiers) - 1):
            raise ValueError("StorageConfig: at most one disk tier, and it must be the last (slowest)")
