"""LayerBuffers: the scout pass and the blend share one prompt's per-layer K/V buffers, so each cached
layer is loaded and re-rotated once per request, and sharing them changes no bit of the fusion."""

import pytest
import torch

from ragkv.blend import BlendConfig, LayerBuffers, PromptState, blend, blend_many, make_plan, make_strategy
from ragkv.blend import prompt_state as ps
from ragkv.blend.query_select import question_attention
from ragkv.blend.query_select import question_attention_many as real
from ragkv.chunk_cache import ChunkKV, precompute


def _prompt(adapter, seed: int = 0):
    """A plan of three chunks, each chunk's KV precomputed alone (at its own positions from 1)."""
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (23, 31, 17)]
    plan = make_plan([1, 4, 6], chunks, torch.randint(3, 256, (9,), generator=g).tolist(), separator_ids=[5])
    sources = [(s, precompute(adapter, chunk)) for (s, _), chunk in zip(plan.chunk_spans, chunks)]
    return plan, sources


class _Counting:
    """Counts the layers a LayerBuffers' loader yields."""

    def __init__(self, buffers: LayerBuffers) -> None:
        self.count, self.inner = 0, buffers._loader
        buffers._loader = self

    def __next__(self):
        self.count += 1
        return next(self.inner)


@pytest.mark.parametrize("strategy", ["focus", "cachecraft"])
def test_the_blend_reads_back_the_layers_its_scout_loaded(tiny_adapter, strategy):
    plan, sources = _prompt(tiny_adapter)
    config = BlendConfig(scout_layers=(1,))  # the scout runs layers 0..1; the blend loads the others itself
    buffers = LayerBuffers(tiny_adapter, plan, sources, reserve=4)
    loads = _Counting(buffers)
    state = PromptState(tiny_adapter, plan, make_strategy(strategy, 0.3, config), reserve=4, layers=buffers)
    assert state.strategy.scouted is not None and buffers.filled == 2 and loads.count == 2
    result = blend_many(tiny_adapter, [state])[0]
    assert loads.count == tiny_adapter.num_layers  # each layer loaded once, by the scout or the blend
    assert [k.data_ptr() for k, _ in result.buffers] == [k.data_ptr() for k, _ in buffers.buffers]
    assert result.buffers[0][0].shape[2] == plan.num_tokens + 4


@pytest.mark.parametrize("strategy", ["focus", "cacheblend+query", "cachecraft", "cachecraft+query"])
def test_sharing_the_scouts_buffers_changes_no_bit(tiny_adapter, strategy):
    plan, sources = _prompt(tiny_adapter, seed=1)
    config = BlendConfig(scout_layers=(1,))
    shared = blend(tiny_adapter, plan, make_strategy(strategy, 0.3, config), sources)
    apart = make_strategy(strategy, 0.3, config)  # scouted over buffers of its own (keep=False), loaded again
    apart.scouted = question_attention(tiny_adapter, plan, sources, config.scout_layers)
    alone = blend(tiny_adapter, plan, apart, sources)
    assert shared.recompute_fraction == alone.recompute_fraction > 0.0
    assert torch.equal(shared.logits, alone.logits)
    for (k1, v1), (k2, v2) in zip(shared.prompt_kv(), alone.prompt_kv()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_layers_fill_in_order_and_a_reused_buffer_is_not_read_back(tiny_adapter):
    plan, sources = _prompt(tiny_adapter)
    kept = LayerBuffers(tiny_adapter, plan, sources)
    with pytest.raises(ValueError, match="layer 0 comes before layer 1"):
        kept.layer(1)
    k, v = kept.layer(0)
    again = kept.layer(0)
    assert again[0] is k and again[1] is v  # read back, not loaded again
    once = LayerBuffers(tiny_adapter, plan, sources, keep=False)
    once.layer(0)
    once.layer(1)
    with pytest.raises(ValueError, match="keep=False"):
        once.layer(0)


def test_a_prompt_refuses_buffers_built_for_another_plan_or_reserve_or_given_beside_sources(tiny_adapter):
    plan, sources = _prompt(tiny_adapter)
    other, _ = _prompt(tiny_adapter, seed=2)
    for buffers in (LayerBuffers(tiny_adapter, other, []), LayerBuffers(tiny_adapter, plan, sources, reserve=3)):
        with pytest.raises(ValueError, match="its own plan and reserve"):
            PromptState(tiny_adapter, plan, make_strategy("naive"), reserve=0, layers=buffers)
    with pytest.raises(ValueError, match="not both"):
        PromptState(
            tiny_adapter, plan, make_strategy("naive"), sources, layers=LayerBuffers(tiny_adapter, plan, sources)
        )


def test_overlapping_sources_are_refused(tiny_adapter):
    plan, sources = _prompt(tiny_adapter)
    start, kv = sources[0]
    with pytest.raises(ValueError, match="must not overlap"):
        LayerBuffers(tiny_adapter, plan, sources + [(start, ChunkKV(kv.kv.clone(), kv.pos0))])


@pytest.mark.parametrize("strategy", ["focus", "cacheblend+query", "cachecraft", "cachecraft+query"])
def test_a_prompt_whose_every_cached_chunk_is_exact_runs_no_scout(tiny_adapter, strategy, monkeypatch):
    """One retrieved chunk computed after the prompt's prefix: no row is a candidate, so the scout pass
    (the cost of a blend again, for nothing to rank) is skipped, and the fusion is the same bits."""
    plan, sources = _prompt(tiny_adapter, seed=3)
    exact = plan.with_exact(range(len(plan.chunk_spans)))
    config = BlendConfig(scout_layers=(1,))
    assert make_strategy(strategy, 0.3, config).wants_scout(plan, sources)  # candidates: it scouts
    assert not make_strategy(strategy, 0.3, config).wants_scout(exact, sources)
    scouts = []
    monkeypatch.setattr(ps, "question_attention_many", lambda *a: scouts.append(a) or real(*a))
    skipped = blend(tiny_adapter, exact, make_strategy(strategy, 0.3, config), sources)
    assert scouts == []
    forced = make_strategy(strategy, 0.3, config)
    forced.scouted = question_attention(tiny_adapter, exact, sources, config.scout_layers)  # the old path
    scouted = blend(tiny_adapter, exact, forced, sources)
    assert skipped.recompute_fraction == scouted.recompute_fraction == 0.0
    assert torch.equal(skipped.logits, scouted.logits)
    for (k1, v1), (k2, v2) in zip(skipped.prompt_kv(), scouted.prompt_kv()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
