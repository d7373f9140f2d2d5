"""The eval runner on the tiny Engine: `full` is its own reference, and every row carries the honest
baseline (`hf`: the model's own forward on the same token ids) and speedups against it."""

from __future__ import annotations

import pytest
from tiny_engine import PASSAGES, tiny_engine

from ragkv.eval.datasets import Sample
from ragkv.eval.runner import Spec, evaluate_sample, summarize


def test_evaluate_sample_reports_speedups_against_full_and_hf():
    engine = tiny_engine()
    sample = Sample("s1", "Where does the river bend?", tuple(PASSAGES), ("the stone bridge",))
    specs = [Spec("full"), Spec("naive"), Spec("cacheblend", 1.0)]
    rows = evaluate_sample(engine, sample, specs, max_new_tokens=4)
    assert list(rows) == ["full", "naive", "cacheblend@1"]
    full = rows["full"]
    assert full["kl_mean"] == 0.0 and full["top1_agreement"] == 1.0 and full["speedup_vs_full"] == 1.0
    # exact up to the prompt prefix's KV, loaded from the store in fp16
    assert rows["cacheblend@1"]["kl_mean"] < 1e-6 and rows["cacheblend@1"]["top1_agreement"] == 1.0
    for label in ("full", "cacheblend@1"):  # the same greedy answer, token for token
        assert rows[label]["same_answer"] == 1.0 and rows[label]["agree_prefix"] == 1.0
        assert rows[label]["f1_vs_full"] == 1.0
    assert rows["naive"]["same_answer"] in (0.0, 1.0) and 0.0 <= rows["naive"]["agree_prefix"] <= 1.0
    hf = full["hf_ttft_ms"]
    for row in rows.values():
        assert row["hf_ttft_ms"] == hf and row["misses"] == 0  # chunk KV was cached before timing
        assert row["speedup_vs_hf"] == pytest.approx(hf / row["ttft_ms"])
        assert sum(row["parts_ms"].values()) == pytest.approx(row["ttft_ms"], rel=0.05)
    summary = summarize([rows])
    assert summary["naive"]["speedup_vs_hf"] == pytest.approx(rows["naive"]["speedup_vs_hf"])
    assert summary["full"]["hf_ttft_ms_median"] == hf


@pytest.mark.parametrize("variants", [2, 0])
def test_eval_counts_the_variants_cachecraft_used(variants):
    from ragkv.blend import BlendConfig

    engine = tiny_engine(blend=BlendConfig(craft_variants=variants))
    sample = Sample("s1", "Where does the river bend?", tuple(PASSAGES), ("the stone bridge",))
    specs = [Spec("full"), Spec("cachecraft", 0.15)]
    rows = evaluate_sample(engine, sample, specs, max_new_tokens=2, context="same")
    craft = rows["cachecraft@0.15"]
    assert craft["variants_used"] == (len(PASSAGES) if variants else 0)  # every chunk, after the prompt prefix
    chunk_tokens = sum(len(c) for c in engine.tokenize_chunks(PASSAGES))
    assert craft["recomputed_chunk_tokens"] == pytest.approx(craft["recompute_fraction"] * chunk_tokens)
    assert rows["full"]["recomputed_chunk_tokens"] == chunk_tokens and rows["full"]["variants_used"] == 0


def test_the_eval_reports_the_guarded_answer_and_the_fused_kv_s_own():
    from ragkv.blend import BlendConfig

    engine = tiny_engine(blend=BlendConfig(answer_guard=1e9))  # every step a near-tie: exact from step 0
    sample = Sample("s1", "Where does the river bend?", tuple(PASSAGES), ("the stone bridge",))
    rows = evaluate_sample(engine, sample, [Spec("full"), Spec("naive")], max_new_tokens=8)
    naive, full = rows["naive"], rows["full"]
    assert naive["same_answer"] == 1.0 and naive["exact_switch"] == 1.0 and naive["exact_from"] == 0
    assert naive["same_answer_unguarded"] == 0.0  # the tiny model's naive fusion answers otherwise
    assert full["exact_switch"] == 0.0 and full["guard_ms"] == 0.0
    assert naive["parts_ms"]["guard"] == naive["guard_ms"] > 0
    assert sum(naive["parts_ms"].values()) == pytest.approx(naive["ttft_ms"], rel=0.05)
