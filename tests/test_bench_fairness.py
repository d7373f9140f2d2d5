"""The fairness benchmark still runs against the sidecar as it is: its stand-in engine had fallen behind
the engine port (`answer_events`), so every chat of the benchmark got a 500 and nothing noticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fairness.py"


def test_the_fairness_benchmark_runs_its_two_tenants_over_http(tmp_path):
    out = tmp_path / "fairness.json"
    args = ["--chats", "3", "--flooders", "1", "--doc-steps", "2", "--step-ms", "5", "--chat-ms", "1"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.loads(out.read_text())
    assert report["chats"] == 3 and report["documents_ingested_during"] >= 1  # tenant A really flooded
    assert 0 < report["solo_p50_ms"] and 0 < report["flooded_p50_ms"] <= report["flooded_p95_ms"]
