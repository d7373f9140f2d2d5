"""Chunk KV computed after the prompt template's prefix (`chunk_context = "prefix"`, the default): keyed by
that prefix, the first chunk's KV exactly the full prefill's rows (marked exact, never recomputed), and
`chunk_context = "sink"` unchanged from earlier versions."""

from __future__ import annotations

import pytest
import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig, blend, make_strategy
from ragkv.blend.prompt_state import PromptState
from ragkv.chunk_cache import chunk_key, precompute, precompute_many
from ragkv.engine.full_prefill import full_prefill
from ragkv.engine.fusion import begin, choose_sources, look_up, resolve_chunks
from ragkv.engine.prompt import PromptTemplate

QUESTION = "Where does the river bend?"


def test_lead_in_is_part_of_the_key_and_the_sink_keeps_old_keys():
    engine = tiny_engine(chunk_context="sink")
    model, ids = engine.model, [40, 41, 42]
    old = chunk_key(model, ids)
    assert chunk_key(model, ids, lead_in=model.sink_ids) == old  # the sink as lead-in: the same entry
    assert chunk_key(model, ids, lead_in=[7, 8, 9]) != old
    assert chunk_key(model, ids, lead_in=[7, 8, 9]) != chunk_key(model, ids, lead_in=[7, 8, 10])
    assert engine.lead_in is None and engine.supply.key(ids, "default") == old


def test_precompute_after_a_lead_in_equals_the_rows_of_one_sequence():
    model = tiny_engine().model
    lead, chunks = [1, 30, 31, 32, 33], [[40, 41, 42, 43], [50, 51]]
    packed = precompute_many(model, chunks, 4096, lead_in=lead)
    for chunk, kv in zip(chunks, packed):
        ids = torch.tensor(lead + chunk)
        whole = model.forward_kv(ids, torch.arange(len(ids)))
        assert kv.pos0 == len(lead)
        torch.testing.assert_close(kv.kv, whole[:, :, len(lead) :], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(precompute(model, chunk, lead).kv, kv.kv, atol=1e-5, rtol=1e-5)


def test_the_first_chunk_is_exact_and_never_recomputed():
    engine = tiny_engine()
    chunks = engine.tokenize_chunks(PASSAGES)
    plan = engine.plan(QUESTION, chunks)
    assert engine.lead_in == plan.prefix_ids and plan.exact_chunks == (0,)
    sources = list(zip([s for s, _ in plan.chunk_spans], engine.supply.compute(chunks)))
    full = full_prefill(engine.model, plan)
    naive = blend(engine.model, plan, make_strategy("naive"), sources)
    start, end = plan.chunk_spans[0]
    for (kf, vf), (kn, vn) in zip(full.prompt_kv(), naive.prompt_kv()):  # no recompute, yet the full prefill's rows
        torch.testing.assert_close(kn[:, :, start:end], kf[:, :, start:end], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vn[:, :, start:end], vf[:, :, start:end], atol=1e-4, rtol=1e-4)
    for name in ("focus", "epic", "cachecraft"):
        strategy = make_strategy(name, 0.5, BlendConfig())
        strategy.prepare(engine.model, plan, sources)
        active = strategy.initial_tokens(plan, plan.chunk_mask())
        assert not bool(active[start:end].any()), name  # the exact chunk's rows are no candidates
        assert bool(active[plan.chunk_spans[1][0] : plan.chunk_spans[-1][1]].any()), name


def test_the_engine_stores_chunks_under_the_lead_in_and_follows_the_template():
    engine = tiny_engine()
    chunks = engine.tokenize_chunks(PASSAGES)
    run = engine.run(QUESTION, PASSAGES, strategy="naive")
    assert run.misses == len(chunks)
    keys = [engine.supply.key(c, "default") for c in chunks]
    assert all(tier is not None for tier in engine.store.lookup(keys))
    assert not any(engine.store.lookup([chunk_key(engine.model, c) for c in chunks]))  # not the sink's entries
    assert engine.run(QUESTION, PASSAGES, strategy="naive").misses == 0
    before = engine.lead_in
    engine.template = PromptTemplate(instruction="Read these passages, then answer.\n")
    assert engine.lead_in != before and engine.plan(QUESTION, chunks).prefix_ids == engine.lead_in
    assert engine.run(QUESTION, PASSAGES, strategy="naive").misses == len(chunks)  # another prefix: new entries


def test_the_first_chunk_is_exact_only_when_its_entry_saw_this_prefix():
    engine = tiny_engine()
    fusion = begin(engine, engine.request(QUESTION, PASSAGES, strategy="naive"))
    resolve_chunks(engine, fusion)
    look_up(engine, fusion)
    choose_sources(engine, fusion)
    assert fusion.plan.exact_chunks == (0,)  # its base entry, computed after this prefix
    other = engine.supply.key([40, 41], "default")
    fusion.strategy.choose_sources = lambda keys, store, prefix=None, first_exact=False: [other] + list(keys[1:])
    choose_sources(engine, fusion)  # another entry (a variant) for the first chunk: not known to be exact
    assert fusion.plan.exact_chunks == ()
    engine_sink = tiny_engine(chunk_context="sink")
    assert engine_sink.plan(QUESTION, engine_sink.tokenize_chunks(PASSAGES)).exact_chunks == ()


def test_unknown_chunk_context_is_refused():
    with pytest.raises(ValueError, match="chunk_context"):
        tiny_engine(chunk_context="neighbours")


def test_the_prompt_prefix_is_loaded_not_recomputed():
    engine = tiny_engine()
    fusion = engine.fuse(engine.request(QUESTION, PASSAGES, strategy="focus", recompute_ratio=0.5))
    fusion.release()
    plan, n = fusion.plan, fusion.plan.prefix_len
    assert fusion.sources[0][0] == 0 and fusion.sources[0][1].num_tokens == n
    assert fusion.run.misses == len(PASSAGES)  # chunks count; the prefix's entry is not a chunk
    state = PromptState(engine.model, plan, make_strategy("focus", 0.5, BlendConfig()), fusion.sources)
    assert int(state.active.min()) >= n  # no prefix row is computed, in any layer
    assert state.num_cached == int(plan.chunk_mask().sum())  # budgets count chunk rows only
    full = full_prefill(engine.model, plan)
    for (kf, vf), (kb, vb) in zip(full.prompt_kv(), fusion.run.blend.prompt_kv()):
        torch.testing.assert_close(kb[:, :, :n], kf[:, :, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vb[:, :, :n], vf[:, :, :n], atol=1e-4, rtol=1e-4)
    again = engine.run(QUESTION, PASSAGES, strategy="focus", recompute_ratio=0.5)
    assert again.misses == 0
    torch.testing.assert_close(again.logits, fusion.run.logits, atol=1e-5, rtol=1e-5)
