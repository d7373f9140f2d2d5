"""EntryInfo: what a tier knows about one entry without reading it, the eviction policy's input.

Its own module (no torch) so that the policies, and with them StorageConfig's check of a policy
name, load without the tiers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chunk_cache import ChunkKey


@dataclass
class EntryInfo:
    """What a tier knows about one entry without reading it; the eviction policy's input."""

    key: ChunkKey
    nbytes: int  # bytes the entry takes in this tier
    num_tokens: int
    cost: float  # recompute cost (defaults to num_tokens)
    hits: int = 0  # reuse frequency
    last_access: int = 0  # logical clock of the store
    priority: float = 0.0  # the policy's score (lowest is evicted first)
