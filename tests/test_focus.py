"""`focus`: the selector recomputes the tokens a constructed question attends to; the adaptive budget stops
early when the question's attention is concentrated (easy) and goes on to its cap when it is spread (hard);
ratio 1 is the full prefill; the budget helpers."""

import pytest
import torch
from tiny_models import tiny_model

from ragkv.blend import BlendConfig, blend, make_plan, make_strategy
from ragkv.blend.focus import chunk_tails, mass_budget, widen
from ragkv.chunk_cache import precompute
from ragkv.models import adapter_for

NEEDLE = 200  # the token the constructed question attends to
LAYER0 = BlendConfig(scout_layers=(0,), focus_mass=0.0)  # a fixed budget: the ratio


def _attending_adapter():
    """A tiny llama whose layer 0 makes every query attend to NEEDLE tokens: every embedding carries a
    constant component (dim 0) that the queries read, the needle alone a large dim 1 that the keys read,
    both in the head dims of RoPE's lowest frequency (so position barely matters)."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [V, 64]
        emb[:, 0] = 0.05
        emb[:, 1] = 0.0
        emb[NEEDLE, 1] = 1.0
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        for head in range(4):
            attn.q_proj.weight[head * 16 + 7, 0] = 2.0
        for head in range(2):
            attn.k_proj.weight[head * 16 + 7, 1] = 2.0
    return adapter_for(model, sink_ids=(1,))


def _prompt(needles: dict[int, list[int]], seed: int = 0):
    """Three chunks of random tokens (never NEEDLE) with NEEDLE at the given (chunk -> offsets)."""
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 190, (n,), generator=g).tolist() for n in (40, 40, 40)]
    for c, offsets in needles.items():
        for o in offsets:
            chunks[c][o] = NEEDLE
    plan = make_plan([1, 9, 9], chunks, [11, 12, 13, 14], separator_ids=[5])
    return plan, chunks


def _sources(adapter, plan, chunks):
    return [(s, precompute(adapter, c)) for (s, _), c in zip(plan.chunk_spans, chunks)]


def _chosen(adapter, plan, chunks, strategy):
    sources = _sources(adapter, plan, chunks)
    strategy.prepare(adapter, plan, sources)
    cached = plan.chunk_mask()
    return (strategy.initial_tokens(plan, cached) & cached).nonzero().flatten().tolist()


def test_focus_recomputes_the_tokens_the_question_attends_to():
    adapter = _attending_adapter()
    needles = {0: [3, 17], 1: [25], 2: [8, 30]}
    plan, chunks = _prompt(needles)
    rows = sorted(plan.chunk_spans[c][0] + o for c, offsets in needles.items() for o in offsets)
    chosen = _chosen(adapter, plan, chunks, make_strategy("focus", 5 / 120, LAYER0))
    assert chosen == rows  # exactly the five needles, the budget's five tokens
    dual = make_strategy("focus", 5 / 120, BlendConfig(scout_layers=(0,), focus_mass=0.0, focus_deviation=0.3))
    result = blend(adapter, plan, dual, _sources(adapter, plan, chunks))
    assert result.recompute_fraction > 0.0 and dual.check_layers() == (1,)


def test_adaptive_budget_stops_early_on_an_easy_prompt_and_goes_further_on_a_hard_one():
    adapter = _attending_adapter()
    config = BlendConfig(scout_layers=(0,), focus_mass=0.8, focus_floor=0.02)
    easy, easy_chunks = _prompt({1: [10]})  # one needle holds nearly all of the question's attention
    hard, hard_chunks = _prompt({})  # no needle: the attention is spread over every chunk token
    fractions = {}
    for name, plan, chunks in (("easy", easy, easy_chunks), ("hard", hard, hard_chunks)):
        result = blend(adapter, plan, make_strategy("focus", 0.5, config), _sources(adapter, plan, chunks))
        fractions[name] = result.recompute_fraction  # the ratio used for this request
    assert fractions["easy"] == pytest.approx(3 / 120)  # the floor: ceil(0.02 * 120) tokens
    assert fractions["hard"] > 0.4  # most of the way to the 0.5 cap
    assert _chosen(adapter, easy, easy_chunks, make_strategy("focus", 0.5, config))[0] == easy.chunk_spans[1][0] + 10


def test_focus_at_ratio_one_is_the_full_prefill():
    adapter = adapter_for(tiny_model("llama", seed=1), sink_ids=(1,))
    plan, chunks = _prompt({})
    full = blend(adapter, plan, make_strategy("full"))
    fixed = BlendConfig(focus_mass=0.0)
    fused = blend(adapter, plan, make_strategy("focus", 1.0, fixed), _sources(adapter, plan, chunks))
    torch.testing.assert_close(fused.logits, full.logits, atol=2e-5, rtol=2e-5)


def test_budget_helpers():
    score = torch.tensor([0.0, 0.5, 0.3, 0.1, 0.1, 0.0])
    candidates = torch.tensor([False, True, True, True, True, True])
    assert mass_budget(score, candidates, 0.5, 1, 5) == 1
    assert mass_budget(score, candidates, 0.8, 1, 5) == 2
    assert mass_budget(score, candidates, 0.95, 1, 5) == 4
    assert mass_budget(score, candidates, 0.95, 1, 3) == 3  # the cap
    assert mass_budget(score, candidates, 0.1, 2, 5) == 2  # the floor
    chosen = torch.tensor([False, False, True, False, False, False])
    assert widen(chosen, candidates, 1).nonzero().flatten().tolist() == [1, 2, 3]
    assert chunk_tails(((1, 4), (5, 9)), 10, 2).nonzero().flatten().tolist() == [2, 3, 7, 8]
    with pytest.raises(ValueError, match="focus_mass"):
        BlendConfig(focus_mass=1.5)
