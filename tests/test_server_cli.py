"""The serving CLI: help texts, `ragkv query` with --doc / --file (real SmolLM2, RAM store), and
`ragkv cache stats | gc` on a temporary data directory's disk tier."""

from __future__ import annotations

import json

import pytest
import torch

from ragkv.cli.main import build_parser, main


@pytest.mark.parametrize("command", ["serve", "query", "cache"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and "usage: ragkv " + command in capsys.readouterr().out


def test_query_with_doc_and_file(smollm2, tmp_path, monkeypatch, capsys):
    from ragkv.engine.engine import Engine
    from ragkv.storage import MemoryTier, TieredStore

    engine = Engine(smollm2, TieredStore([MemoryTier(1 << 30)]))
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **k: engine))
    monkeypatch.setattr(engine.store, "close", lambda: None)  # the CLI closes its store; this one is reused
    f = tmp_path / "doc.txt"
    f.write_text("Lake Constance feeds the Rhine.")
    args = [
        "query",
        "Where does the Rhine bend north?",
        "--doc",
        "The Rhine bends north at Basel.",
        "--file",
        str(f),
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["text"] and first["misses"] == 2
    assert main(args) == 0
    assert sum(json.loads(capsys.readouterr().out)["hits"].values()) == 2
    assert main(["query", "q", "--strategy", "magic"]) == 2
    err = capsys.readouterr().err
    assert "setting blend: unknown strategy 'magic'; accepted: full" in err


def test_cache_stats_and_gc(tmp_path, capsys):
    from ragkv.chunk_cache import ChunkKey, ChunkKV
    from ragkv.engine.config import EngineConfig
    from ragkv.storage.build import build_store

    store = build_store(EngineConfig(data_dir=str(tmp_path)).storage_config())
    for ns in ("tenant-a", "tenant-b"):
        key = ChunkKey.of("m", "t", [1, 2, 3], ns)
        store.tiers[-1].put(key, ChunkKV(torch.randn(2, 2, 3, 1, 4), pos0=0))  # [2, layers, tokens, heads, dim]
    store.close()  # the disk tier keeps them
    assert main(["cache", "stats", "--data-dir", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {t["name"]: t["entries"] for t in stats["tiers"]}["disk"] == 2
    assert main(["cache", "gc", "--data-dir", str(tmp_path), "--namespace", "tenant-a", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["would_drop"] == 1
    assert main(["cache", "gc", "--data-dir", str(tmp_path), "--namespace", "tenant-a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == 1
    assert main(["cache", "stats", "--data-dir", str(tmp_path), "--json"]) == 0
    assert {t["name"]: t["entries"] for t in json.loads(capsys.readouterr().out)["tiers"]}["disk"] == 1


def test_ingested_kv_outlives_the_process(smollm2, tmp_path):
    """Ingest through the Engine (as `ragkv ingest` and `POST /v1/documents` do), close it, reopen the
    default store of the same data dir (as `ragkv serve` / `query` do): the chunk KV is a disk hit."""
    from ragkv.engine.config import EngineConfig
    from ragkv.engine.engine import Engine
    from ragkv.retriever import Document
    from ragkv.storage.build import build_store

    cfg = EngineConfig(data_dir=str(tmp_path))
    engine = Engine(smollm2, build_store(cfg.storage_config()), cfg)
    assert engine.ingest(documents=[Document("d", "The Danube flows through Vienna.")]).kv_computed == 1
    keys = engine.retriever().chunk_keys()
    engine.close()
    store = build_store(cfg.storage_config())
    assert len(keys) == 1 and store.lookup(keys) == ["disk"]
    store.close()
