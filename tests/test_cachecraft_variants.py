"""Chunk KV variants and cachecraft's use of them: variant keys, the store round trip, eviction by
utility, exact variants recomputing nothing (logits of the full prefill), partial variants shrinking
the budget, early stop for unfocused chunks, and the Engine's context pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig, blend, make_plan, make_strategy
from ragkv.blend.chunk_metadata import record_context
from ragkv.blend.query_select import question_attention
from ragkv.blend.variant_choice import choose_variants, overlap
from ragkv.chunk_cache import ChunkKey, ChunkKV, precompute
from ragkv.engine.context_pass import in_context_kv, prefix_key
from ragkv.engine.full_prefill import full_prefill
from ragkv.storage import DiskTier, MemoryTier, TieredStore, materialize
from ragkv.storage.metadata import ChunkMetadata, MemoryMetadata, SqlMetadata, metadata_store
from ragkv.storage.variants import VariantRecord, store_variant, variant_key, variant_utility, variants_to_evict

TOL = dict(atol=2e-5, rtol=2e-5)
QUESTION = "Where does the river bend?"


def _chunks(seed=0, lengths=(23, 31, 17)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _plan(chunks, query=(7, 8, 9, 10, 11)):
    return make_plan([1], chunks, list(query), separator_ids=[5])  # prefix = the sink: chunk 0's base is exact


def _keys(chunks):
    return [ChunkKey.of("model", "tok", c) for c in chunks]


def _kv(tokens=4, layers=2, value=0.0):
    return ChunkKV(torch.full((2, layers, tokens, 2, 8), value), pos0=1)


def test_variant_keys_are_deterministic_and_differ_by_preceding_order():
    a, b, c = (ChunkKey.of("m", "t", [i], "tenant") for i in (1, 2, 3))
    assert c.variant([a, b]) == ChunkKey.of("m", "t", [3], "tenant").variant([a, b])
    assert c.variant([a, b]) != c.variant([b, a])
    assert c.variant([a]) != c.variant([a, b]) and c.variant([a]) != c
    assert b.variant([a]) != c.variant([a])
    assert c.variant([]) == c  # nothing before it: the base entry
    assert c.variant([a]).namespace == "tenant"
    assert ChunkKey.parse(str(c.variant([a]))) == c.variant([a])


def test_overlap_counts_foreign_preceding_chunks_against_a_variant():
    a, b, x = (ChunkKey.of("m", "t", [i]) for i in (1, 2, 9))
    assert overlap((x, a), (a,)) == 0.5  # its KV also saw x, which is not there now
    assert overlap((a,), ()) == 0.0  # first chunk now: a variant computed after a is worse than the base
    assert overlap((a, b), (a, b)) == 1.0


def test_utility_is_reuse_times_compute_saved_per_byte():
    assert variant_utility(3, 200.0, 1000) == pytest.approx(0.6)
    assert variant_utility(0, 200.0, 1000) == 0.0
    base = ChunkKey.of("m", "t", [1])
    recs = [
        VariantRecord(base.variant([ChunkKey.of("m", "t", [i])]), base, (), 100, saved, reuses, created)
        for i, (saved, reuses, created) in enumerate([(50.0, 2, 1.0), (500.0, 1, 2.0), (50.0, 0, 3.0), (50.0, 0, 0.5)])
    ]
    # utilities 1.0, 5.0, 0, 0: the two never reused go, the older first; the newest is kept when asked
    assert variants_to_evict(recs, 2) == [recs[3], recs[2]]
    assert variants_to_evict(recs, 3, keep=recs[3].key) == [recs[2]]
    assert variants_to_evict(recs, 4) == []


@pytest.mark.parametrize("disk", [False, True])
def test_variant_round_trips_through_the_store_and_is_evicted_by_utility(tmp_path, disk):
    tiers = [MemoryTier(1 << 20)] + ([DiskTier(tmp_path / "kv", 1 << 30)] if disk else [])
    store = TieredStore(tiers)
    meta = metadata_store(store)
    assert isinstance(meta, SqlMetadata if disk else MemoryMetadata)
    base, a, b, c = (ChunkKey.of("m", "t", [i]) for i in (1, 2, 3, 4))
    kv_a = ChunkKV(torch.randn(2, 2, 4, 2, 8), pos0=7)
    key_a = store_variant(store, meta, base, [a], kv_a, limit=2, compute_saved=30)
    assert key_a == base.variant([a]) and store.lookup([key_a])[0] == "cpu"
    store.wait_written()
    if disk:  # a first-class entry: written behind to the disk tier, checksummed, read back the same
        assert store.tiers[1].lookup(key_a)
        back = materialize(store.tiers[1].get(key_a))
    else:
        back = store.get(key_a)
    torch.testing.assert_close(back.kv, kv_a.kv)
    assert back.pos0 == 7
    key_ab = store_variant(store, meta, base, [a, b], _kv(), limit=2, compute_saved=40)
    meta.count_reuses([key_a])
    meta.count_reuses([key_a, key_ab])
    records = {r.key: r for r in meta.variants_of([base])[0]}
    rec_a, rec_ab = records[key_a], records[key_ab]
    assert (rec_a.key, rec_a.preceding, rec_a.reuses, rec_a.nbytes) == (key_a, (a,), 2, kv_a.nbytes)
    assert (rec_ab.preceding, rec_ab.reuses, rec_ab.compute_saved) == ((a, b), 1, 40.0)
    # a third variant: the limit is 2, so the least useful other one (1 x 40 / bytes < 2 x 30 / bytes) goes
    key_c = store_variant(store, meta, base, [c], _kv(), limit=2, compute_saved=5)
    assert {r.key for r in meta.variants_of([base])[0]} == {key_a, key_c}
    assert store.lookup([key_ab]) == [None]  # gone from every tier
    assert meta.variants_of([a]) == [[]]
    store.close()


def _exact_setup(adapter, chunks):
    """A memory store holding the base entries, metadata from a context pass and the exact in-context
    variants of chunks 1.. (from a full prefill of this very prompt)."""
    plan, keys = _plan(chunks), _keys(chunks)
    store = TieredStore([MemoryTier()])
    meta = metadata_store(store)
    for key, chunk in zip(keys, chunks):
        store.put(key, precompute(adapter, chunk))
    record_context(adapter, plan, [(s, store.get(k)) for (s, _), k in zip(plan.chunk_spans, keys)], keys, meta)
    prefill = full_prefill(adapter, plan)
    for i in range(1, len(chunks)):
        s, e = plan.chunk_spans[i]
        store_variant(store, meta, keys[i], keys[:i], in_context_kv(prefill, s, e), limit=2, compute_saved=e)
    return plan, keys, store, meta, prefill


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_exact_variants_recompute_nothing_and_give_the_full_prefill_logits(tiny_adapter, alpha):
    chunks = _chunks(seed=1)
    plan, keys, store, meta, prefill = _exact_setup(tiny_adapter, chunks)
    choices = choose_variants(keys, meta, store)
    assert [c.exact for c in choices] == [False, True, True] and choices[0].key == keys[0]
    strategy = make_strategy("cachecraft", 0.15, BlendConfig(craft_alpha=alpha))
    strategy.bind(keys, meta, choices)
    sources = [(s, store.get(c.key)) for (s, _), c in zip(plan.chunk_spans, choices)]
    result = blend(tiny_adapter, plan, strategy, sources)
    torch.testing.assert_close(result.logits, prefill.logits, **TOL)
    decisions = result.chunk_decisions
    assert [d.source for d in decisions] == ["base", str(keys[1].variant(keys[:1])), str(keys[2].variant(keys[:2]))]
    assert [(d.action, d.recomputed, d.reason) for d in decisions[1:]] == [("reuse", 0, "exact variant")] * 2
    n = sum(len(c) for c in chunks)
    # alpha: chunk 0 (its base, nothing before it) has weight 0 too; ratio: only chunk 0 is in the pool
    expected = 0 if alpha else int(np.ceil(0.15 * len(chunks[0]) - 1e-9))
    assert decisions[0].recomputed == expected
    assert result.recompute_fraction == pytest.approx(expected / n)


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_a_partial_overlap_variant_shrinks_the_budget(tiny_adapter, alpha):
    a, b, c = _chunks(seed=2, lengths=(20, 20, 30))
    keys = _keys([a, b, c])
    store = TieredStore([MemoryTier()])
    meta = metadata_store(store)
    for key, chunk in zip(keys, (a, b, c)):
        store.put(key, precompute(tiny_adapter, chunk))
        meta.put(key, ChunkMetadata(0.5, np.arange(len(chunk)), ()))
    plan = _plan([a, b, c])
    sources = [(s, store.get(k)) for (s, _), k in zip(plan.chunk_spans, keys)]
    config = BlendConfig(craft_alpha=alpha)
    without = make_strategy("cachecraft", 0.2, config)
    without.bind(keys, meta, choose_variants(keys, meta, store))  # no variants yet: every chunk its base
    without.prepare(tiny_adapter, plan, sources)
    # c as computed after a only: half of what is before it now (a, b)
    other = _plan([a, c])
    s, e = other.chunk_spans[1]
    store_variant(store, meta, keys[2], keys[:1], in_context_kv(full_prefill(tiny_adapter, other), s, e), 2, e)
    choices = choose_variants(keys, meta, store)
    assert choices[2].key == keys[2].variant(keys[:1]) and choices[2].overlap == 0.5 and not choices[2].exact
    with_variant = make_strategy("cachecraft", 0.2, config)
    with_variant.bind(keys, meta, choices)
    with_variant.prepare(tiny_adapter, plan, sources)
    before, after = without.decisions(), with_variant.decisions()
    assert after[2].source == str(choices[2].key) and after[2].action == "fix"
    assert 0 < after[2].recomputed < before[2].recomputed
    assert sum(d.recomputed for d in after) < sum(d.recomputed for d in before)
    if alpha:  # ceil(0.8 * 0.5 * (1 - overlap) * 30)
        assert (before[2].recomputed, after[2].recomputed) == (12, 6)


def test_early_stop_skips_chunks_the_question_barely_attends(tiny_adapter):
    chunks = _chunks(seed=3, lengths=(20, 20, 20, 20))
    plan, keys = _plan(chunks), _keys(chunks)
    sources = [(s, precompute(tiny_adapter, c)) for (s, _), c in zip(plan.chunk_spans, chunks)]
    meta = MemoryMetadata()
    record_context(tiny_adapter, plan, sources, keys, meta)
    config = BlendConfig()
    att = question_attention(tiny_adapter, plan, sources, config.scout_layers)
    shares = sorted(float(att[s:e].sum()) for s, e in plan.chunk_spans)
    threshold = (shares[1] + shares[2]) / 2  # two chunks fall under it
    strategy = make_strategy("cachecraft", 0.3, BlendConfig(craft_focus=threshold))
    strategy.bind(keys, meta)
    strategy.prepare(tiny_adapter, plan, sources)
    for (s, e), d in zip(plan.chunk_spans, strategy.decisions()):
        unfocused = float(att[s:e].sum()) < threshold
        assert (d.reason == "unfocused") == unfocused
        assert (d.recomputed == 0) == unfocused
    assert sum(d.reason == "unfocused" for d in strategy.decisions()) == 2


def test_engine_context_pass_stores_variants_that_a_recurring_prompt_reuses():
    engine = tiny_engine()
    report = engine.record_context(QUESTION, PASSAGES)
    keys = report.keys
    prefix = prefix_key(engine.model, engine.plan(QUESTION, engine.tokenize_chunks(PASSAGES)), "default")
    # every chunk, the first too, as computed after the prompt prefix and the chunks before it
    assert report.variants == [variant_key(k, keys[:i], prefix) for i, k in enumerate(keys)]
    assert len(report.metadata) == len(PASSAGES)
    meta = metadata_store(engine.store)
    run = engine.run(QUESTION, PASSAGES, strategy="cachecraft", recompute_ratio=0.15)
    used = [d for d in run.blend.chunk_decisions if d.used_variant]
    assert [d.source for d in used] == [str(k) for k in report.variants]
    assert all(d.recomputed == 0 and d.reason == "exact variant" for d in used)
    assert [r.reuses for rs in meta.variants_of(keys) for r in rs] == [1, 1, 1]  # counted after the run
    full = engine.run(QUESTION, PASSAGES, strategy="full")
    torch.testing.assert_close(run.logits, full.logits, **TOL)  # exact everywhere: the full prefill's logits
    reordered = engine.run(QUESTION, PASSAGES[::-1], strategy="cachecraft", recompute_ratio=0.15)
    assert not any(d.used_variant for d in reordered.blend.chunk_decisions)  # other order: base entries
    # the same prompt with variants off: every chunk loads its base entry, and no variant is stored
    off = tiny_engine(blend=BlendConfig(craft_variants=0))
    assert off.record_context(QUESTION, PASSAGES).variants == []
    plain = off.run(QUESTION, PASSAGES, strategy="cachecraft", recompute_ratio=0.15)
    assert [d.source for d in plain.blend.chunk_decisions] == ["base"] * len(PASSAGES)
    assert plain.blend.recompute_fraction > run.blend.recompute_fraction


def test_a_new_first_passage_leaves_later_chunks_partial_variants():
    from ragkv.eval.context import record_sample_context

    engine = tiny_engine()
    chunks = engine.tokenize_chunks(PASSAGES)
    record_sample_context(engine, QUESTION, chunks, "new-first")  # context: passages 1, 2 only
    run = engine.run(QUESTION, chunks=chunks, strategy="cachecraft", recompute_ratio=0.3)
    first, second, third = run.blend.chunk_decisions
    assert (first.source, second.source) == ("base", "base")  # passage 1 led the context: no variant of it
    assert third.used_variant and third.overlap == 0.5 and third.reason == ""  # saw passage 1, not passage 0
