"""Where chunk KV bytes live: tiers (GPU/CPU memory, disk + SQL catalog) and the TieredStore policy.

Read path for the Engine: `lookup(keys)` -> `with pinned(keys):` -> `get_layered(key, device)` and
`.layer(l)` per layer -> (unpin promotes lower-tier hits). Write path: `put(key, kv)` after precompute.
"""

from .config import StorageConfig, TierConfig, build_store
from .disk import DiskTier
from .disk_check import CheckReport
from .layered import EncodedLayers, ResidentKV, materialize
from .memory import MemoryTier
from .policy import POLICIES, CostAwarePolicy, LRUPolicy, Policy, UtilityPolicy, make_policy
from .redis_link import RedisLink
from .redis_tier import RedisTier
from .stats import StoreStats, TierStats
from .tier import EntryInfo, Tier, TierWriteError
from .tiered import TieredStore

__all__ = [
    "Tier",
    "EntryInfo",
    "TierWriteError",
    "MemoryTier",
    "DiskTier",
    "RedisTier",
    "RedisLink",
    "CheckReport",
    "TieredStore",
    "StoreStats",
    "TierStats",
    "StorageConfig",
    "TierConfig",
    "build_store",
    "Policy",
    "LRUPolicy",
    "CostAwarePolicy",
    "UtilityPolicy",
    "POLICIES",
    "make_policy",
    "EncodedLayers",
    "ResidentKV",
    "materialize",
]
