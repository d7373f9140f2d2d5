"""The trace replay's parts that need a model, on the tiny Engine: measured per-token costs, and the
real-run sample (each strategy against a full prefill of the same prompt, cachecraft at the replayed
budget)."""

from __future__ import annotations

import pytest
from test_trace_replay import BIG, COSTS, write_trace
from tiny_engine import tiny_engine

from ragkv.eval.trace import Segment, load_trace
from ragkv.eval.trace_costs import measure_costs
from ragkv.eval.trace_replay import parse_sim_strategies, replay
from ragkv.eval.trace_sample import corpus_ids, run_sample, segment_ids


def test_segment_text_is_deterministic_and_of_the_right_length():
    corpus = list(range(1000))
    a, b = segment_ids(corpus, Segment("passages", 7, 300)), segment_ids(corpus, Segment("passages", 7, 300))
    assert a == b and len(a) == 300
    assert segment_ids(corpus, Segment("passages", 8, 300)) != a  # another id, another window
    assert len(segment_ids(corpus, Segment("passages", 9, 2500))) == 2500  # longer than the corpus: wraps


def test_measure_costs_on_the_tiny_engine():
    engine = tiny_engine()
    costs = measure_costs(engine, corpus_ids(engine), tokens=64, chunk_tokens=32, repeats=1)
    assert costs.prefill_ms_per_token > 0
    assert set(costs.load_ms_per_token) == {"gpu", "cpu", "disk"} and min(costs.load_ms_per_token.values()) > 0
    assert costs.full_layer_share == pytest.approx(1 / engine.model.num_layers)


def test_real_run_sample_against_full_prefill(tmp_path):
    engine = tiny_engine()
    trace = write_trace(tmp_path)
    requests = load_trace(trace)
    strategies = parse_sim_strategies("prefix,cacheblend@0.15,epic@0.15,cachecraft")
    _, kept = replay(requests, strategies[-1], BIG, COSTS, keep=[4])
    out = run_sample(engine, requests, [4], kept, strategies, alpha=0.5, cci=1.0)
    assert out["requests"] == [4] and out["cachecraft_ratio"] == {4: pytest.approx(0.5)}  # 100 of 200 tokens
    results = out["results"]
    assert list(results) == ["full", "prefix", "cacheblend@0.15", "epic@0.15", "cachecraft"]
    assert results["full"]["kl_mean"] == 0.0 and results["full"]["top1_agreement"] == 1.0
    assert results["prefix"]["kl_mean"] < 1e-6  # exact reuse
    # ceil(15) of the second 100-token chunk: the first is exact (computed after this prompt's prefix)
    assert results["epic@0.15"]["recompute_fraction"] == pytest.approx(15 / 200)
    assert results["cachecraft"]["recompute_fraction"] == pytest.approx(0.25)  # half of the second chunk
    assert results["cacheblend@0.15"]["kl_mean"] > 0  # fused KV is not the full prefill's
    # passages of 100 tokens each, the question from the user input (5 tokens), inside the chat template
    assert results["full"]["prompt_tokens_mean"] > 200
