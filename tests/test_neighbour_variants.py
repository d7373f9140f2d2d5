"""Neighbour variants (engine/neighbour_variants.py): opt-in at ingestion, each chunk's KV after its
nearest chunk by embedding; cachecraft loads it when that neighbour precedes the chunk (never as exact);
removing the neighbour's document removes it."""

from __future__ import annotations

import torch
from retriever_fakes import HashEmbedder
from tiny_engine import PASSAGES, tiny_engine_adapter

from ragkv.blend import BlendConfig
from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.engine.ingest import IngestConfig
from ragkv.engine.neighbour_variants import neighbours
from ragkv.retriever import Document
from ragkv.storage import MemoryTier, TieredStore
from ragkv.storage.metadata import metadata_store

QUESTION = "Where does the river bend?"


def _engine(tmp_path):
    config = EngineConfig(data_dir=str(tmp_path), max_new_tokens=4, blend=BlendConfig(craft_serve="off"))
    return Engine(tiny_engine_adapter(), TieredStore([MemoryTier()]), config, embedder=HashEmbedder())


def test_neighbour_variants_are_stored_at_ingest_used_by_cachecraft_and_removed_with_the_neighbour(tmp_path):
    engine = _engine(tmp_path)
    docs = [Document(id=f"d{i}", text=t) for i, t in enumerate(PASSAGES)]
    report = engine.ingest(documents=docs, config=IngestConfig(progress=False, neighbour_variants=1))
    assert report.neighbour_variants == len(PASSAGES)
    retriever = engine.retriever()
    hits = {h.doc_id: h for h in engine.retrieve(QUESTION, k=3)}
    chunk = hits["d0"]
    near = neighbours(retriever, chunk.key, chunk.token_ids, 1)[0]
    meta = metadata_store(engine.store)
    (record,) = meta.variants_of([chunk.key])[0]
    assert record.preceding == (near.key,)
    # the stored rows are the chunk's KV computed right after its neighbour (after the sink)
    whole = engine.model.forward_kv(
        torch.tensor(list(engine.model.sink_ids) + list(near.token_ids) + list(chunk.token_ids)),
        torch.arange(len(engine.model.sink_ids) + len(near.token_ids) + len(chunk.token_ids)),
    )
    stored = engine.store.get(record.key)
    assert stored.pos0 == len(engine.model.sink_ids) + len(near.token_ids)
    torch.testing.assert_close(stored.kv.float(), whole[:, :, stored.pos0 :].float(), atol=2e-3, rtol=2e-3)

    run = engine.run(QUESTION, chunks=[near.token_ids, chunk.token_ids], strategy="cachecraft", recompute_ratio=0.2)
    decision = run.blend.chunk_decisions[1]
    assert decision.used_variant and decision.overlap == 1.0 and decision.reason != "exact variant"
    other = engine.run(QUESTION, chunks=[chunk.token_ids, near.token_ids], strategy="cachecraft", recompute_ratio=0.2)
    assert not other.blend.chunk_decisions[0].used_variant  # nothing before it: its base entry

    engine.remove_documents([near.doc_id])
    assert meta.variants_of([chunk.key]) == [[]] and engine.store.lookup([record.key]) == [None]
    engine.close()


def test_neighbour_variants_are_off_by_default(tmp_path):
    engine = _engine(tmp_path)
    report = engine.ingest(documents=[Document(id=f"d{i}", text=t) for i, t in enumerate(PASSAGES)])
    assert report.neighbour_variants == 0
    keys = [h.key for h in engine.retrieve(QUESTION, k=3)]
    assert metadata_store(engine.store).variants_of(keys) == [[], [], []]
    engine.close()
