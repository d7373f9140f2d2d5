"""The GPU load benchmark (benchmarks/bench_gpu_load.py) as a step of scripts/gpu_check.sh: its dry run
(tiny model, CPU) through the script fuses every request batched and one by one, with the same first
tokens, and writes every mode's requests/s and the target's ratio."""

from __future__ import annotations

import json

from test_gpu_check import _run


def test_gpu_check_lists_the_load_step_and_its_dry_run_writes_every_mode(tmp_path):
    listed = _run("--list", out=tmp_path)
    assert "load" in dict(line.split() for line in listed.stdout.splitlines())
    done = _run("--dry-run", "--only", "load", out=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["steps"]) == {"load"} and summary["steps"]["load"]["rc"] == 0
    report = json.loads((tmp_path / "bench_gpu_load.json").read_text())
    modes = {"full_batched", "default_batched", "default_one_by_one", "full_one_by_one"}
    assert set(report["modes"]) == modes and all(m["requests_per_s"] > 0 for m in report["modes"].values())
    assert report["strategy"] == "focus" and report["requests"] == 3 and report["same_first_token"] == 3
    assert 0.0 < min(report["recompute_fraction"]) < 1.0  # the default strategy recomputed part of the chunks
    assert report["x_full_batched"] > 0 and report["decode"]["tokens"] > 0
