"""What a cached chunk is: its key, its KV layout, and how it is precomputed.

This folder imports nothing else of ragkv; every other folder builds on it.
"""

from .key import ChunkKey
from .kv import ChunkKV, LayeredKV
from .precompute import KVModel, chunk_key, lead_in_fingerprint, precompute, precompute_many

__all__ = [
    "ChunkKey",
    "ChunkKV",
    "LayeredKV",
    "KVModel",
    "chunk_key",
    "lead_in_fingerprint",
    "precompute",
    "precompute_many",
]
