"""What a cached chunk is: its key, its KV layout, and how it is precomputed.

This folder imports nothing else of ragkv; every other folder builds on it. Names are exported
lazily (lazy_exports.py): `ChunkKey`, `chunk_key`, `LeadIn` and `lead_in_fingerprint` (key.py) import no
torch, so the retriever's search path stays light; `ChunkKV`, `LayeredKV` and `precompute` load torch when first used.
"""

from ..lazy_exports import lazy_exports

lazy_exports(
    __name__,
    {
        "ChunkKey": "key",
        "chunk_key": "key",
        "LeadIn": "key",
        "lead_in_fingerprint": "key",
        "ChunkKV": "kv",
        "LayeredKV": "kv",
        "KVModel": "precompute",
        "precompute": "precompute",
        "precompute_many": "precompute",
        "packs": "precompute",
    },
)
