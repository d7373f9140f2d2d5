"""Where chunk KV bytes live: tiers (GPU/CPU memory, disk + SQL catalog) and the TieredStore policy.

Read path for the Engine: `lookup(keys)` -> `with pinned(keys):` -> `get_layered(key, device)` and
`.layer(l)` per layer -> (unpin promotes lower-tier hits). Write path: `put(key, kv)` after precompute.

Names are exported lazily (lazy_exports.py): config.py (StorageConfig, TierConfig), policy.py, schema.py
and sql.py import no torch, so the settings tree and the document catalog load without the tiers.
"""

from ..lazy_exports import lazy_exports

lazy_exports(
    __name__,
    {
        "Tier": "tier",
        "EntryInfo": "entry",
        "TierWriteError": "tier",
        "MemoryTier": "memory",
        "DiskTier": "disk",
        "RedisTier": "redis_tier",
        "RedisLink": "redis_link",
        "CheckReport": "disk_check",
        "TieredStore": "tiered",
        "StoreStats": "stats",
        "TierStats": "stats",
        "StorageConfig": "config",
        "TierConfig": "config",
        "build_store": "build",
        "Policy": "policy",
        "LRUPolicy": "policy",
        "CostAwarePolicy": "policy",
        "UtilityPolicy": "policy",
        "POLICIES": "policy",
        "make_policy": "policy",
        "EncodedLayers": "layered",
        "ResidentKV": "layered",
        "materialize": "layered",
    },
)
