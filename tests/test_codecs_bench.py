"""`ragkv bench codecs` pieces that need no model: the per-codec statistics and the table."""

from __future__ import annotations

import bench_codecs
import pytest
import torch
from bench_codecs import codec_stats, markdown_table
from test_codecs import make_kv

from ragkv.compression import get_codec


class SteadyClock:
    """Stands in for the `time` module: every reading is 0.5 s after the last, so each timed span
    is 0.5 s and the MB/s figures are known exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.5
        return self.now


def _mb_per_half_second(kvs) -> float:
    return 2 * sum(kv.kv.numel() for kv in kvs) / 0.5 / 1e6  # fp16-equivalent bytes in 0.5 s


def test_codec_stats_measure_size_and_error(monkeypatch):
    monkeypatch.setattr(bench_codecs, "time", SteadyClock())
    kvs = [make_kv(shape=(2, 2, 50, 2, 8), dtype=torch.float16, seed=s) for s in range(2)]
    ident = codec_stats(get_codec("identity"), kvs)
    assert 16.0 < ident["bits_per_value"] < 17.0 and ident["rel_error"] == 0.0  # fp16 + a little metadata
    cg = codec_stats(get_codec("cachegen"), kvs)
    # > 2x only: make_kv spreads key channels over 100x, and one key step per layer gives the loud
    # channels many levels (real SmolLM2 KV: 8.2x, tests/test_codecs_lossy.py)
    assert cg["ratio_vs_fp16"] > 2 and 0 < cg["rel_error"] <= cg["stated_rel_error"]
    speed = _mb_per_half_second(kvs)
    assert cg["encode_mb_s"] == cg["decode_mb_s"] == cg["decode_1core_mb_s"] == pytest.approx(speed)
    table = markdown_table({"identity": ident, "cachegen": cg})
    assert table.splitlines()[0].startswith("| codec | bits_per_value") and "| cachegen |" in table


def test_codec_stats_through_a_decode_pool(monkeypatch):
    from ragkv.compression import DecodePool

    monkeypatch.setattr(bench_codecs, "time", SteadyClock())

    kvs = [make_kv(shape=(2, 3, 60, 2, 16), dtype=torch.float16, seed=s) for s in range(2)]
    with DecodePool(1) as pool:
        cg = codec_stats(get_codec("cachegen"), kvs, pool)  # raises if the pool's output differs from inline
        ident = codec_stats(get_codec("identity"), kvs, pool)
    assert cg["decode_mb_s"] == cg["decode_1core_mb_s"] == pytest.approx(_mb_per_half_second(kvs))
    assert ident["decode_mb_s"] == ident["decode_1core_mb_s"]  # inline: identity gains nothing from workers
