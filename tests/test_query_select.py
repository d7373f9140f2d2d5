"""Query-aware selection (cacheblend+query): the scout pass measures the question's true attention (alone
or packed with other prompts' scouts), the chosen tokens are its top ones, the budget is respected, and
ratio 1 is the full prefill."""

import pytest
import torch
from tiny_models import returned_cache

from ragkv.blend import BlendConfig, blend, make_plan, make_strategy
from ragkv.blend.layer_buffers import LayerBuffers
from ragkv.blend.query_select import query_rows_start, question_attention, question_attention_many, top_rows
from ragkv.blend.select import budget
from ragkv.chunk_cache import ChunkKV, precompute

TOL = dict(atol=2e-5, rtol=2e-5)


def _prompt(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (23, 31, 17)]
    prefix = [1] + torch.randint(3, 256, (5,), generator=g).tolist()
    query = torch.randint(3, 256, (7,), generator=g).tolist()
    return make_plan(prefix, chunks, query, separator_ids=[5]), chunks


def _full_prefill(adapter, plan):
    """Reference K/V [2, L, N, H, D] and attention probabilities per layer [H, N, N] from transformers."""
    with torch.inference_mode():
        out = adapter.model(plan.input_ids[None], use_cache=True, output_attentions=True)
    kv = torch.stack(
        [
            torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)])
            for lay in returned_cache(out).layers
        ],
        dim=1,
    )
    return kv, [a[0].float() for a in out.attentions], out.logits[0, -1].float()


def _in_context_sources(plan, kv):
    """Each chunk's rows of the full prefill as its cached KV: fusion is then exact."""
    return [(s, ChunkKV(kv[:, :, s:e].clone(), pos0=s)) for s, e in plan.chunk_spans]


def _reference_score(plan, attentions, layers):
    chunk = plan.chunk_mask()
    q0 = query_rows_start(plan)
    total = torch.zeros(plan.num_tokens)
    for layer in layers:
        mass = attentions[layer][:, q0:, :].sum(dim=(0, 1)) * chunk
        total += mass / mass.sum()
    return total / len(layers)


@pytest.mark.parametrize("layers", [(1,), (1, 2)])
def test_scout_measures_the_questions_true_attention(tiny_adapter, layers):
    plan, _ = _prompt()
    kv, attentions, _ = _full_prefill(tiny_adapter, plan)
    score = question_attention(tiny_adapter, plan, _in_context_sources(plan, kv), layers)
    torch.testing.assert_close(score, _reference_score(plan, attentions, layers), atol=1e-5, rtol=1e-4)
    assert float(score[~plan.chunk_mask()].abs().sum()) == 0.0  # only chunk rows are ranked


def test_packed_scouts_of_different_prompts_each_measure_their_own_attention(tiny_adapter, monkeypatch):
    layers = (1, 2)
    prompts, references = [], []
    opening = _prompt(2)[0].input_ids[:6].tolist()
    for seed, keep, prefix in ((2, 3, opening), (3, 1, opening), (4, 2, [1, 9, 8, 7])):
        _, chunks = _prompt(seed)  # different lengths, chunks and questions
        plan = make_plan(prefix, chunks[:keep], [7, 9, 11, 13 + seed], [5])
        kv, attentions, _ = _full_prefill(tiny_adapter, plan)
        prompts.append((plan, _in_context_sources(plan, kv)))
        references.append(_reference_score(plan, attentions, layers))
    no_chunks = make_plan([1, 4, 6], [], [7, 8])  # nothing to rank: zeros, and no scout row of its own
    packed, qkv = [], tiny_adapter.qkv
    monkeypatch.setattr(tiny_adapter, "qkv", lambda layer, h, *a: packed.append(h.shape[0]) or qkv(layer, h, *a))
    buffers = [LayerBuffers(tiny_adapter, plan, sources) for plan, sources in prompts + [(no_chunks, [])]]
    scores = question_attention_many(tiny_adapter, buffers, layers)
    fresh = sum(plan.num_tokens - int(plan.chunk_mask().sum()) for plan, _ in prompts)
    assert packed == [fresh] * 3  # every prompt's fresh rows in one pass per layer, up to the last observed one
    monkeypatch.setattr(tiny_adapter, "qkv", qkv)
    assert len({plan.num_tokens for plan, _ in prompts}) == 3
    for score, reference, (plan, sources) in zip(scores, references, prompts):
        torch.testing.assert_close(score, reference, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(score, question_attention(tiny_adapter, plan, sources, layers), **TOL)
    assert scores[-1].shape == (no_chunks.num_tokens,) and float(scores[-1].abs().sum()) == 0.0


def test_query_aware_choice_is_the_top_attended_chunk_tokens(tiny_adapter):
    plan, _ = _prompt(seed=1)
    kv, attentions, _ = _full_prefill(tiny_adapter, plan)
    sources = _in_context_sources(plan, kv)
    strategy = make_strategy("cacheblend+query", 0.2, BlendConfig(scout_layers=(1,)))
    strategy.prepare(tiny_adapter, plan, sources)
    cached = plan.chunk_mask()
    active = strategy.initial_tokens(plan, cached)
    chosen = active & cached
    expected = _reference_score(plan, attentions, (1,))[cached].topk(budget(0.2, int(cached.sum()))).indices
    assert sorted(cached.nonzero().flatten()[expected].tolist()) == chosen.nonzero().flatten().tolist()
    assert bool(active[~cached].all())  # every fresh row is computed
    assert strategy.check_layers() == ()  # chosen before layer 0: no check layer


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.5])
def test_recompute_fraction_is_the_budget(tiny_adapter, ratio):
    plan, chunks = _prompt(seed=2)
    sources = [(s, precompute(tiny_adapter, c)) for (s, _), c in zip(plan.chunk_spans, chunks)]
    result = blend(tiny_adapter, plan, make_strategy("cacheblend+query", ratio), sources)
    num_cached = sum(len(c) for c in chunks)
    assert result.recompute_fraction == pytest.approx(budget(ratio, num_cached) / num_cached)


def test_ratio_one_equals_full_prefill(tiny_adapter):
    plan, chunks = _prompt(seed=3)
    _, _, ref_logits = _full_prefill(tiny_adapter, plan)
    sources = [(s, precompute(tiny_adapter, c)) for (s, _), c in zip(plan.chunk_spans, chunks)]
    result = blend(tiny_adapter, plan, make_strategy("cacheblend+query", 1.0), sources)
    torch.testing.assert_close(result.logits, ref_logits, **TOL)
    assert result.recompute_fraction == 1.0


def test_top_rows_picks_only_candidates():
    score = torch.tensor([9.0, 1.0, 5.0, 7.0, 3.0])
    candidates = torch.tensor([False, True, True, True, True])
    assert top_rows(score, candidates, 2).nonzero().flatten().tolist() == [2, 3]
    assert int(top_rows(score, candidates, 10).sum()) == 4


def test_selection_suffix_is_validated():
    assert make_strategy("cacheblend+query", 0.15).config.select == "query"
    assert make_strategy("cacheblend+check", 0.15).check_layers() == (1,)
    with pytest.raises(ValueError, match="selection suffix is accepted only on cacheblend, cachecraft"):
        make_strategy("epic+query", 0.15)
    with pytest.raises(ValueError, match=r"\+check, \+query"):
        make_strategy("cacheblend+deviation", 0.15)
    with pytest.raises(ValueError, match="scout_layers"):
        BlendConfig(scout_layers=())


def test_scout_layers_past_the_models_depth_are_dropped(tiny_adapter):
    plan, _ = _prompt(seed=4)
    kv, attentions, _ = _full_prefill(tiny_adapter, plan)  # the tiny models have 4 layers
    sources = _in_context_sources(plan, kv)
    deep = question_attention(tiny_adapter, plan, sources, (2, 6, 12))
    torch.testing.assert_close(deep, _reference_score(plan, attentions, (2,)), atol=1e-5, rtol=1e-4)
    last = question_attention(tiny_adapter, plan, sources, (20, 29))
    torch.testing.assert_close(last, _reference_score(plan, attentions, (3,)), atol=1e-5, rtol=1e-4)
