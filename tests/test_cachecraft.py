"""cachecraft and chunk metadata: the context pass measures true cross-chunk attention, budgets and
tokens follow the metadata, ratio 1 is the full prefill, and metadata round-trips through the store."""

import numpy as np
import pytest
import torch
from tiny_models import returned_cache

from ragkv.blend import BlendConfig, blend, make_plan, make_strategy
from ragkv.blend.cachecraft import allocate, overlap
from ragkv.blend.chunk_metadata import cci_of, context_metadata, record_context
from ragkv.chunk_cache import ChunkKey, ChunkKV, precompute
from ragkv.storage import DiskTier, MemoryTier, TieredStore
from ragkv.storage.metadata import ChunkMetadata, MemoryMetadata, SqlMetadata, metadata_store

TOL = dict(atol=2e-5, rtol=2e-5)


def _prompt(seed: int = 0, lengths=(23, 31, 17)):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    prefix = [1] + torch.randint(3, 256, (5,), generator=g).tolist()
    query = torch.randint(3, 256, (7,), generator=g).tolist()
    return make_plan(prefix, chunks, query, separator_ids=[5]), chunks


def _keys(chunks):
    return [ChunkKey.of("model", "tok", c) for c in chunks]


def _sources(adapter, plan, chunks):
    return [(s, precompute(adapter, c)) for (s, _), c in zip(plan.chunk_spans, chunks)]


def test_context_pass_measures_true_cross_chunk_attention(tiny_adapter):
    plan, chunks = _prompt()
    with torch.inference_mode():
        out = tiny_adapter.model(plan.input_ids[None], output_attentions=True)
    att = out.attentions[1][0].float().sum(0)  # [N, N] layer 1, summed over heads
    metas = context_metadata(tiny_adapter, plan, [], _keys(chunks), layers=(1,))
    for i, ((start, end), meta) in enumerate(zip(plan.chunk_spans, metas)):
        before = torch.zeros(plan.num_tokens, dtype=torch.bool)
        for s, e in plan.chunk_spans[:i]:
            before[s:e] = True
        cross = att[start:end][:, before].sum(1)  # [T]
        within = float(att[start:end, start:end].sum())
        assert meta.cci == pytest.approx(cci_of(float(cross.sum()), within), rel=1e-4, abs=1e-6)
        assert meta.preceding == tuple(_keys(chunks)[:i])
        if i > 0:  # the top-ranked tokens carry the most cross attention
            top = cross[torch.as_tensor(meta.ranking[:5])]
            assert torch.equal(top, cross.sort(descending=True).values[:5]) or torch.allclose(
                top, cross.sort(descending=True).values[:5], atol=1e-5
            )
    assert metas[0].cci == 0.0 and metas[1].cci > 0.0


def _store_with(plan, chunks, ccis, rankings):
    store = MemoryMetadata()
    keys = _keys(chunks)
    for i, (key, cci, ranking) in enumerate(zip(keys, ccis, rankings)):
        store.put(key, ChunkMetadata(cci, np.asarray(ranking), tuple(keys[:i])))
    return keys, store


def test_cachecraft_picks_the_recorded_tokens_by_alpha_cci(tiny_adapter):
    plan, chunks = _prompt(seed=1, lengths=(10, 20, 10))
    rankings = [list(range(10))[::-1], list(range(20)), [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]]
    keys, store = _store_with(plan, chunks, [0.9, 0.25, 0.5], rankings)
    strategy = make_strategy("cachecraft", 0.15, BlendConfig(craft_alpha=0.8))
    strategy.bind(keys, store)
    strategy.prepare(tiny_adapter, plan, _sources(tiny_adapter, plan, chunks))
    cached = plan.chunk_mask()
    chosen = (strategy.initial_tokens(plan, cached) & cached).nonzero().flatten().tolist()
    (s0, _), (s1, _), (s2, _) = plan.chunk_spans
    # chunk 0 is first (nothing before it now, as when its KV was computed): reused as is;
    # chunk 1: ceil(0.8 * 0.25 * 20) = 4 tokens, its ranking's first; chunk 2: ceil(0.8 * 0.5 * 10) = 4
    assert chosen == sorted([s1 + t for t in (0, 1, 2, 3)] + [s2 + t for t in (3, 1, 4, 0)])
    assert strategy.fractions == [0.0, 0.2, 0.4]


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.4])
def test_cachecraft_recomputes_its_ratio_of_chunk_tokens(tiny_adapter, ratio):
    plan, chunks = _prompt(seed=2)
    sources = _sources(tiny_adapter, plan, chunks)
    keys, store = _keys(chunks), MemoryMetadata()
    record_context(tiny_adapter, plan, sources, keys, store)
    strategy = make_strategy("cachecraft", ratio)
    strategy.bind(keys, store)
    result = blend(tiny_adapter, plan, strategy, sources)
    n = sum(len(c) for c in chunks)
    assert result.recompute_fraction == pytest.approx(int(np.ceil(ratio * n - 1e-9)) / n)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_cachecraft_at_full_budget_equals_full_prefill(tiny_adapter, with_metadata):
    plan, chunks = _prompt(seed=3)
    with torch.inference_mode():
        ref_logits = tiny_adapter.model(plan.input_ids[None]).logits[0, -1].float()
    sources = _sources(tiny_adapter, plan, chunks)
    strategy = make_strategy("cachecraft", 1.0)
    if with_metadata:  # else every chunk is new: the query-aware fallback
        keys, store = _keys(chunks), MemoryMetadata()
        record_context(tiny_adapter, plan, sources, keys, store)
        strategy.bind(keys, store)
    result = blend(tiny_adapter, plan, strategy, sources)
    torch.testing.assert_close(result.logits, ref_logits, **TOL)
    assert result.recompute_fraction == 1.0


def test_allocate_floors_caps_and_sums():
    counts = allocate([0.0, 1.0, 3.0], [100, 100, 10], 60, 0.25)
    assert sum(counts) == 60 and counts[2] == 10  # capped at its length
    assert counts[0] == int(0.25 * 60 * 100 / 210)  # a zero-weight chunk keeps its floor
    assert allocate([0.0, 0.0], [5, 7], 12, 0.0) == [5, 7]  # the whole budget is always handed out


def test_overlap_penalises_missing_and_reordered_chunks():
    a, b, c = (ChunkKey.of("m", "t", [i]) for i in (1, 2, 3))
    assert overlap((), ()) == 1.0
    assert overlap((), (a,)) == 0.0
    assert overlap((a, b), (a, b)) == 1.0
    assert overlap((a,), (a, b)) == 0.5
    assert overlap((b, a), (a, b)) == 0.0
    assert overlap((a, c), (a, b, c)) == pytest.approx(2 / 3)  # b is new; a, c in order


def _meta(n=600):
    ranking = np.random.default_rng(0).permutation(n)
    return ChunkMetadata(0.37, ranking, (ChunkKey.of("m", "t", [1]), ChunkKey.of("m", "t", [2], "ns")))


def _same(a: ChunkMetadata, b: ChunkMetadata) -> bool:
    return a.cci == b.cci and np.array_equal(a.ranking, b.ranking) and a.preceding == b.preceding


def test_metadata_round_trips_through_a_disk_store(tmp_path):
    store = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path / "kv", 1 << 30)])
    meta_store = metadata_store(store)
    assert isinstance(meta_store, SqlMetadata) and metadata_store(store) is meta_store
    key, meta = ChunkKey.of("m", "t", [7, 8]), _meta()
    meta_store.put(key, meta)
    assert len(meta.ranking_blob()) == 2 * 600  # uint16 per token, one blob
    reopened = SqlMetadata(store.tiers[1].catalog.url)  # persisted in the catalog database
    assert _same(reopened.get(key), meta)
    assert reopened.get(ChunkKey.of("m", "t", [9])) is None
    reopened.delete([key])
    assert meta_store.get(key) is None
    store.close()


def test_memory_store_keeps_metadata_and_refuses_bad_rankings():
    store = TieredStore([MemoryTier(1 << 20)])
    meta_store = metadata_store(store)
    assert isinstance(meta_store, MemoryMetadata)
    key, meta = ChunkKey.of("m", "t", [7]), _meta(5)
    meta_store.put(key, meta)
    assert _same(meta_store.get(key), meta)
    with pytest.raises(ValueError, match="permutation"):
        ChunkMetadata(0.5, np.array([0, 0, 1]), ())
    with pytest.raises(ValueError, match="cci"):
        ChunkMetadata(1.5, np.array([0]), ())


def test_record_keeps_what_an_earlier_context_learned(tiny_adapter):
    plan, chunks = _prompt(seed=4)
    keys, store = _keys(chunks), MemoryMetadata()
    record_context(tiny_adapter, plan, [], keys, store)
    learned = store.get(keys[1])
    flipped = make_plan([1, 9], [chunks[1], chunks[0]], [7, 8])
    record_context(tiny_adapter, flipped, [], [keys[1], keys[0]], store)
    assert store.get(keys[1]) is learned  # first in the new prompt: nothing learned, kept
    assert store.get(keys[0]).preceding == (keys[1],)


def test_in_context_kv_is_reused_unchanged_at_ratio_zero(tiny_adapter):
    plan, chunks = _prompt(seed=5)
    with torch.inference_mode():
        out = tiny_adapter.model(plan.input_ids[None], use_cache=True)
    kv = torch.stack(
        [
            torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)])
            for lay in returned_cache(out).layers
        ],
        dim=1,
    )
    sources = [(s, ChunkKV(kv[:, :, s:e].clone(), pos0=s)) for s, e in plan.chunk_spans]
    result = blend(tiny_adapter, plan, make_strategy("cachecraft", 0.0), sources)
    torch.testing.assert_close(result.logits, out.logits[0, -1].float(), **TOL)
    assert result.recompute_fraction == 0.0


def test_eval_context_order_is_validated():
    from ragkv.eval.context import record_sample_context

    accepted = "accepted: reversed, same, new-first, served, none"
    with pytest.raises(ValueError, match=f"unknown context order 'sideways'; {accepted}"):
        record_sample_context(None, "q?", [[3, 4]], "sideways")
