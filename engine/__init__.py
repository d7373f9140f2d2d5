"""The library's facade and what it is composed of: `EngineConfig`, the prompt template, the Engine
(lookup, precompute, blend, decode), ingestion, and the per-namespace document service."""

from .answer import Answer
from .config import EngineConfig
from .engine import Engine

__all__ = ["Answer", "Engine", "EngineConfig"]
