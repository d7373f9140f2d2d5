"""ragkv: RAG KV-cache reuse middleware.

Each retrieved chunk's KV cache is computed once, stored in tiers, and fused at query time
(keys re-rotated to their new positions, a few well-chosen tokens recomputed: CacheBlend).
The one facade is `Engine`; it is imported lazily so that `import ragkv.chunk_cache` stays light.
"""

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'ragkv' has no attribute {name!r}")
