"""`ragkv bench codecs` pieces that need no model: dataset loading, the per-codec statistics, the table."""

from __future__ import annotations

import json

import pytest
import torch
from test_codecs import make_kv

from ragkv.compression import get_codec
from ragkv.server.commands.bench import codec_stats, load_musique, markdown_table


def test_load_musique_takes_the_first_records_and_rejects_other_files(tmp_path):
    good = tmp_path / "m.json"
    good.write_text(json.dumps([{"ctxs": [{"title": "t", "text": "x"}], "question": "q", "answers": ["a"]}] * 3))
    assert len(load_musique(good, 2)) == 2
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="musique JSON list"):
        load_musique(bad, 2)


def test_codec_stats_measure_size_and_error():
    kvs = [make_kv(shape=(2, 2, 50, 2, 8), dtype=torch.float16, seed=s) for s in range(2)]
    ident = codec_stats(get_codec("identity"), kvs)
    assert 16.0 < ident["bits_per_value"] < 17.0 and ident["rel_error"] == 0.0  # fp16 + a little metadata
    cg = codec_stats(get_codec("cachegen"), kvs)
    assert cg["ratio_vs_fp16"] > 4 and 0 < cg["rel_error"] <= cg["stated_rel_error"]
    assert cg["decode_mb_s"] > 0 and cg["encode_mb_s"] > 0
    table = markdown_table({"identity": ident, "cachegen": cg})
    assert table.splitlines()[0].startswith("| codec | bits_per_value") and "| cachegen |" in table
