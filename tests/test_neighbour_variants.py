"""Neighbour variants (engine/neighbour_variants.py): at ingestion (k = 2 by default) or for chunks given
directly, each chunk's KV after the prompt prefix and its nearest chunks by embedding; focus loads it in
any prompt, cachecraft when those neighbours precede the chunk (never as exact); removing the
neighbour's document removes it."""

from __future__ import annotations

import torch
from retriever_fakes import HashEmbedder
from tiny_engine import PASSAGES, tiny_engine_adapter

from ragkv.blend import BlendConfig
from ragkv.blend.variant_choice import choose_context
from ragkv.chunk_cache import ChunkKey, ChunkKV
from ragkv.engine.config import EngineConfig
from ragkv.engine.context_pass import prefix_ids_key
from ragkv.engine.engine import Engine
from ragkv.engine.ingest import IngestConfig
from ragkv.engine.neighbour_variants import index_neighbours
from ragkv.eval.datasets import Sample
from ragkv.eval.runner import Spec, run_eval
from ragkv.retriever import Document
from ragkv.storage import MemoryTier, TieredStore
from ragkv.storage.metadata import metadata_store
from ragkv.storage.variants import store_variant

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
    near = index_neighbours(retriever)(chunk.key, chunk.token_ids, 1)[0]
    meta = metadata_store(engine.store)
    (record,) = meta.variants_of([chunk.key])[0]
    assert record.preceding == (near.key,)
    lead_in = list(engine.lead_in)  # the prompt template's prefix: what every chunk's KV is computed after
    assert record.key == chunk.key.variant((prefix_ids_key(engine.model, lead_in, "default"), near.key))
    # the stored rows are the chunk's KV computed right after the prompt prefix and its neighbour, placed
    # with the template's separator as in a prompt
    context = lead_in + list(near.token_ids) + list(engine.lead_in_separator)
    whole = engine.model.forward_kv(
        torch.tensor(context + list(chunk.token_ids)), torch.arange(len(context) + len(chunk.token_ids))
    )
    stored = engine.store.get(record.key)
    assert stored.pos0 == len(context)
    torch.testing.assert_close(stored.kv.float(), whole[:, :, stored.pos0 :].float(), atol=2e-3, rtol=2e-3)

    run = engine.run(QUESTION, chunks=[near.token_ids, chunk.token_ids], strategy="cachecraft", recompute_ratio=0.2)
    decision = run.blend.chunk_decisions[1]  # this prompt is that context: the variant is the full prefill's rows
    assert decision.used_variant and decision.overlap == 1.0 and decision.reason == "exact variant"
    other = engine.run(QUESTION, chunks=[chunk.token_ids, near.token_ids], strategy="cachecraft", recompute_ratio=0.2)
    assert not other.blend.chunk_decisions[0].used_variant  # nothing before it: its base entry

    doc_of = {h.key: h.doc_id for h in engine.retrieve(QUESTION, k=len(PASSAGES))}
    engine.remove_documents([doc_of[near.key]])
    assert meta.variants_of([chunk.key]) == [[]] and engine.store.lookup([record.key]) == [None]
    engine.close()


def test_neighbour_variants_can_be_turned_off(tmp_path):
    engine = _engine(tmp_path)
    docs = [Document(id=f"d{i}", text=t) for i, t in enumerate(PASSAGES)]
    report = engine.ingest(documents=docs, config=IngestConfig(progress=False, neighbour_variants=0))
    assert report.neighbour_variants == 0
    keys = [h.key for h in engine.retrieve(QUESTION, k=3)]
    assert metadata_store(engine.store).variants_of(keys) == [[], [], []]
    engine.close()


def test_ingestion_stores_two_neighbour_variants_per_chunk_by_default(tmp_path):
    engine = _engine(tmp_path)
    report = engine.ingest(documents=[Document(id=f"d{i}", text=t) for i, t in enumerate(PASSAGES)])
    assert report.neighbour_variants == len(PASSAGES)
    keys = [h.key for h in engine.retrieve(QUESTION, k=3)]
    assert [len(r.preceding) for rs in metadata_store(engine.store).variants_of(keys) for r in rs] == [2, 2, 2]
    engine.close()


def test_focus_loads_a_neighbour_variant_in_any_prompt_and_fuses_it_instead_of_the_base_entry(tmp_path):
    """Chunks given directly: `store_neighbour_variants` computes each after its nearest passage of the
    corpus. focus loads the variant even though that neighbour is not in the prompt; the exact first
    chunk keeps its base entry; with no recompute its fusion differs from the base entries' (naive)."""
    engine = _engine(tmp_path)
    first, second, *corpus = engine.tokenize_chunks(PASSAGES)
    stored = engine.store_neighbour_variants([second], corpus, k=1)  # its neighbour comes from `corpus`
    assert len(stored) == 1 and engine.store_neighbour_variants([second], corpus, k=1) == []  # held: kept
    run = engine.run(QUESTION, chunks=[first, second], strategy="focus", recompute_ratio=0.0)
    a, b = run.blend.chunk_decisions
    assert a.source == "base"  # computed after this very prefix: the full prefill's rows
    assert b.source == str(stored[0]) and b.overlap == 0.0  # its neighbour is not in this prompt
    base = engine.run(QUESTION, chunks=[first, second], strategy="naive")
    assert not torch.allclose(run.blend.logits, base.blend.logits)
    engine.close()


def test_choose_context_prefers_exact_then_overlap_and_ignores_another_prefix():
    """focus's rule: any variant after this prompt's prefix beats the base entry, the one overlapping the
    chunks before it most wins (an exact one first), a variant after another prefix is never taken, and
    an exact first chunk keeps its base entry."""
    store = TieredStore([MemoryTier(1 << 24)])
    meta = metadata_store(store)
    first, second, third, far, other_far = (ChunkKey.of("m", "t", [i]) for i in range(5))
    prefix, other_prefix = ChunkKey.of("m:prefix", "t", [9]), ChunkKey.of("m:prefix", "t", [8])

    def kv():
        return ChunkKV(torch.zeros(2, 2, 3, 2, 8), pos0=5)

    store_variant(store, meta, first, [far], kv(), 4, 10, prefix)  # a neighbour variant of the first chunk
    near = store_variant(store, meta, third, [far, other_far], kv(), 4, 10, prefix)  # neighbours not in the prompt
    exact = store_variant(store, meta, third, [first, second], kv(), 4, 10, prefix)  # exactly its context
    store_variant(store, meta, second, [first], kv(), 4, 10, other_prefix)  # after another template's prefix
    keys = [first, second, third]

    choices = choose_context(keys, meta, store, prefix, first_exact=True)
    assert [c.key for c in choices[:2]] == [first, second]  # exact first chunk; other prefix: base
    assert choices[2].key == exact and choices[2].exact
    store.remove(exact)  # gone from the store: the neighbour variant, though none of its neighbours is here
    choices = choose_context(keys, meta, store, prefix, first_exact=False)
    assert choices[2].key == near and choices[2].overlap == 0.0 and not choices[2].exact
    assert choices[0].is_variant  # not exact: the first chunk takes its neighbour variant too
    assert [c.key for c in choose_context(keys, meta, store, None)] == keys  # no prefix known: base entries


def test_the_eval_stores_neighbour_variants_once_before_timing_and_focus_loads_them(tmp_path):
    engine = _engine(tmp_path)
    samples = [Sample(f"s{i}", QUESTION, tuple(PASSAGES[i : i + 2]), ("the stone bridge",)) for i in (0, 1)]
    specs = [Spec("full"), Spec("focus", 0.0), Spec("naive")]
    _, rows = run_eval(engine, samples, specs, max_new_tokens=2, neighbours=1)
    assert [row["focus@0"]["variants_used"] for row in rows] == [1, 1]  # every chunk but the exact first
    assert [row["naive"]["variants_used"] for row in rows] == [0, 0]  # the papers' baseline: base entries
    assert engine.store_neighbour_variants(engine.tokenize_chunks(PASSAGES), k=1) == []  # all held already
    engine.close()
