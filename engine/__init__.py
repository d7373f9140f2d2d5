"""The library's facade and what it is composed of: the settings tree, `EngineConfig`, the prompt
template, the Engine (lookup, precompute, blend, decode), ingestion, and the per-namespace document
service. Names are imported lazily so that `ragkv.engine.settings` (pydantic only) stays light."""

__all__ = ["Answer", "Engine", "EngineConfig"]


def __getattr__(name: str):
    if name == "Answer":
        from .answer import Answer

        return Answer
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'ragkv.engine' has no attribute {name!r}")
