"""The GPU benchmark's dry run (tiny model, CPU, one repeat) runs every code path the GPU run takes."""

from __future__ import annotations

import json

import pytest


def test_bench_gpu_dry_run_covers_every_row(tmp_path):
    import bench_gpu

    out = tmp_path / "bench_gpu.json"
    assert bench_gpu.main(["--dry-run", "--out", str(out), "--precompute-tokens", "8"]) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == []
    rows = {(r["tokens"], r["strategy"], r["source"], r["attention"]) for r in report["rows"]}
    for tokens in (37, 53):  # 2 and 3 chunks of 16 tokens + BOS + a 4-token query
        assert (tokens, "hf-forward", "-", "sdpa") in rows and (tokens, "full", "-", "auto") in rows
        assert (tokens, "naive", "gpu", "auto") in rows
        for source in ("pinned", "disk-lz4", "disk-int8", "disk-packed", "disk-packed/whole"):
            assert (tokens, "cacheblend@0.15", source, "dense") in rows
        assert (tokens, "cacheblend+query@0.15", "gpu", "dense") in rows  # any strategy name runs
        for attention in ("blocks", "dense", "flex"):
            assert (tokens, "cacheblend@0.15", "gpu", attention) in rows and (
                tokens,
                "epic@0.15",
                "gpu",
                attention,
            ) in rows
    by_key = {(r["tokens"], r["strategy"], r["source"], r["attention"]): r for r in report["rows"]}
    cb = by_key[(53, "cacheblend@0.15", "gpu", "dense")]
    assert cb["recompute_fraction"] == by_key[(53, "cacheblend@0.15", "disk-lz4", "dense")]["recompute_fraction"]
    assert 0.15 < cb["recompute_fraction"] < 1.0 and cb["limit_x"] > 1.0
    assert by_key[(53, "naive", "gpu", "auto")]["recompute_fraction"] == 0.0
    assert report["precompute"][0]["chunk_tokens"] == 8
    per_layer, whole = (
        by_key[(53, "cacheblend@0.15", "disk-packed", "dense")],
        by_key[(53, "cacheblend@0.15", "disk-packed/whole", "dense")],
    )
    assert per_layer["lookup_ms"] is not None and whole["lookup_ms"] is not None  # the look-up before layer 0
    assert per_layer["recompute_fraction"] == whole["recompute_fraction"]
    assert all(isinstance(shape, list) and len(shape) == 2 for shape in report["flex_shapes"])  # flex rows ran


def test_bench_gpu_refuses_unknown_shapes_and_sources(tmp_path):
    import bench_gpu

    with pytest.raises(ValueError, match="unknown shape 'gpt-5'; accepted: llama-3.1-8b, llama-3.2-1b, tiny"):
        bench_gpu.build_model("gpt-5", "cpu", None)
    with pytest.raises(ValueError, match="unknown source 'nvme'; accepted: gpu, pinned, disk-CODEC"):
        bench_gpu.make_stores("nvme", [], bench_gpu.torch.device("cpu"), tmp_path)
