"""Where chunk KV bytes live: tiers (GPU/CPU memory, disk, remote) and the TieredStore policy."""

from .memory import MemoryTier
from .tier import Tier
from .tiered import StoreStats, TieredStore

__all__ = ["Tier", "MemoryTier", "TieredStore", "StoreStats"]
