"""scripts/gpu_check.sh: every step it lists has a command, and its dry run (CPU, tiny shapes) writes each
step's output and a summary with every step's exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(*args, out: Path, timeout: int = 600):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_steps_are_listed_with_limits_that_fit_the_device_budget(tmp_path):
    done = _run("--list", out=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = dict(line.split() for line in done.stdout.splitlines())
    assert {"pytest_gpu", "kernels", "encode", "bench"} <= set(steps)
    assert sum(int(limit) for limit in steps.values()) <= 560  # a device command: 600 s at most, with the wheels


def test_dry_run_writes_a_summary_of_every_step_run(tmp_path):
    done = _run("--dry-run", "--only", "encode,pytest_gpu", out=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] == 1 and set(summary["steps"]) == {"encode", "pytest_gpu"}
    assert all(step["rc"] == 0 for step in summary["steps"].values())
    encode = json.loads((tmp_path / "gpu_encode.json").read_text())
    assert encode["rows"] and all(row["same_bytes"] for row in encode["rows"])
    assert (tmp_path / "env.txt").read_text().count("ragkv from") == 1


def test_unknown_bench_strategies_fail_before_any_model_work():
    import bench_gpu

    with pytest.raises(ValueError, match="unknown strategy"):
        bench_gpu.parse_args(["--dry-run", "--strategies", "hf,cacheblend@0.15,fastest@0.1"])
