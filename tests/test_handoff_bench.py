"""The hand-off benchmark's dry run (tiny model, CPU, two processes): the producer fuses and publishes,
the consumer process runs the connector's load path into a FlashAttention-layout paged cache, and the
rows it wrote equal what was fused, for every path that works without CUDA."""

from __future__ import annotations

import json

import pytest
from checkout_path import checkout_first_on_sys_path


@pytest.fixture
def checkout_importable(tmp_path, monkeypatch):
    """The consumer is a spawned process: it imports `ragkv` from sys.path, so put this checkout first."""
    checkout_first_on_sys_path(tmp_path, monkeypatch)


def test_bench_handoff_dry_run_hands_over_exact_rows(tmp_path, checkout_importable):
    import bench_handoff

    out = tmp_path / "bench_handoff.json"
    assert bench_handoff.main(["--dry-run", "--tokens", "40,90", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["tokens"], r["path"]): r for r in report["rows"]}
    sizes = sorted({t for t, _ in rows})
    assert len(sizes) == 2 and set(rows) == {(t, p) for t in sizes for p in ("shm", "file")}
    for row in rows.values():
        assert row["ok"] and row["path_taken"] == row["path"] and row["fallback"] == []
        assert row["handoff_ms"] >= row["load_ms"] > 0 and row["ttft_ms"] > row["blend_ms"]
    assert report["skipped"] == [f"{t} tokens, cuda_ipc: needs CUDA" for t in sizes]
    assert report["errors"] == []


def test_a_wrong_row_is_caught_by_the_check():
    import torch
    from bench_handoff import SAMPLE, check_sample

    kv = torch.randn(2, 10, 2, 8)
    sample = {(0, 0): kv[0, :SAMPLE].clone(), (1, 5): kv[1, 5 : 5 + SAMPLE].clone()}
    assert check_sample(sample, kv)
    sample[(1, 5)][2, 1, 3] += 1
    assert not check_sample(sample, kv) and not check_sample({}, kv)
