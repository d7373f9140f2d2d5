"""Removing (or replacing) a document removes its chunks' KV variants, those computed after its chunks
(their KV holds its content), and its chunks' metadata; other variants stay."""

from __future__ import annotations

import pytest
from retriever_fakes import HashEmbedder
from tiny_engine import PASSAGES, tiny_engine_adapter

from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.retriever import Document
from ragkv.storage import DiskTier, MemoryTier, TieredStore
from ragkv.storage.metadata import metadata_store

QUESTION = "Where does the river bend?"


def _store(tmp_path, kind):
    if kind == "memory":
        return TieredStore([MemoryTier()])
    return TieredStore([MemoryTier(), DiskTier(tmp_path / "cache", 1 << 30)])  # metadata in the SQL catalog


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_removing_a_document_removes_its_variants(tmp_path, kind):
    config = EngineConfig(data_dir=str(tmp_path / "data"), max_new_tokens=4)
    engine = Engine(tiny_engine_adapter(), _store(tmp_path, kind), config, embedder=HashEmbedder())
    engine.ingest(documents=[Document(id=f"d{i}", text=t) for i, t in enumerate(PASSAGES)])
    hits = {h.doc_id: h for h in engine.retrieve(QUESTION, k=3)}
    a, b, c = (hits[f"d{i}"] for i in range(3))
    first = engine.record_context(QUESTION, chunks=[a.token_ids, b.token_ids, c.token_ids])  # b after a, c after a b
    other = engine.record_context(QUESTION, chunks=[c.token_ids, a.token_ids])  # a after c: no b anywhere
    meta = metadata_store(engine.store)
    involving_b = set(first.variants[1:])  # b's, and c's computed after a and b
    kept = set(other.variants) | {first.variants[0]}  # a after the prompt prefix alone; c, then a after c
    assert involving_b and kept and not involving_b & kept
    assert all(engine.store.lookup([k])[0] for k in involving_b | kept)
    assert meta.get(b.key) is not None

    engine.remove_documents(["d1"])

    assert not any(engine.store.lookup(list(involving_b)))  # b's own variant and c's (computed after b)
    records = {r.key for rs in meta.variants_of([a.key, b.key, c.key]) for r in rs}
    assert records == kept  # a's variant after c stays, recorded and stored
    assert all(engine.store.lookup(list(kept)))
    assert meta.get(b.key) is None and meta.get(a.key) is not None
    run = engine.run(QUESTION, chunks=[c.token_ids, a.token_ids], strategy="cachecraft", recompute_ratio=0.15)
    assert [d.used_variant for d in run.blend.chunk_decisions] == [True, True]  # the kept ones still serve
    engine.close()
