"""Per-model codec schedules: the bit allocation follows measured sensitivity within the budget, a
schedule round-trips through its JSON file keyed by model fingerprint, the store's tiers take its
bits only for that model's packed codec (defaults otherwise), and bad files are named."""

from __future__ import annotations

import json

import pytest
from test_codecs import make_kv

from ragkv.compression import Lz4Codec, get_codec
from ragkv.compression.packed import PackedCodec, PackedConfig
from ragkv.compression.schedule import CodecSchedule, codec_with_schedule, find_schedule, schedule_path
from ragkv.eval.calibration import allocate_bits, band_layers, schedule_for_budget
from ragkv.storage.config import StorageConfig, TierConfig, build_store

SENSITIVITY = {"K": [0.02, 0.01, 0.3, 0.001], "V": [0.004, 0.002, 0.05, -0.001]}


def test_allocation_spends_the_budget_where_it_hurts():
    key_bits, value_bits = allocate_bits(SENSITIVITY, code_bits=2.5, probe_bits=2, min_bits=1)
    assert sum(key_bits) + sum(value_bits) == 20  # 2.5 bits x 8 slots
    assert key_bits[2] == max(key_bits) and key_bits[2] > key_bits[3]  # the loudest band gets the most
    assert value_bits[3] == 1  # a band measured harmless (negative excess) keeps the minimum
    assert sum(key_bits) > sum(value_bits)
    more_k, more_v = allocate_bits(SENSITIVITY, code_bits=3.0, probe_bits=2, min_bits=1)
    assert all(a >= b for a, b in zip(more_k + more_v, key_bits + value_bits))  # a larger budget only adds bits


def test_allocation_refuses_budgets_below_the_minimum():
    with pytest.raises(ValueError, match="below min_bits"):
        allocate_bits(SENSITIVITY, code_bits=1.5, min_bits=2)


def test_bands_match_the_codec_bands():
    config = PackedConfig(key_bits=(1, 2, 3, 4, 5, 6))
    for band in range(6):
        assert {config.bits(i, 30)[0] for i in band_layers(band, 6, 30)} == {band + 1}
    assert sorted(i for b in range(4) for i in band_layers(b, 4, 30)) == list(range(30))


def _schedule(fp="model-A", budget=2.5):
    measured = {"sensitivity_excess_kl": SENSITIVITY, "probe_bits": 2, "min_bits": 1, "grid_bits": 0.06}
    return schedule_for_budget(fp, measured, budget)


def test_schedule_round_trips_and_is_found_by_fingerprint(tmp_path):
    schedule = _schedule()
    path = schedule.save(schedule_path(tmp_path, "model-A"))
    loaded = CodecSchedule.load(path)
    assert loaded.key_bits == schedule.key_bits and loaded.value_bits == schedule.value_bits
    assert find_schedule(tmp_path, "model-A").key_bits == schedule.key_bits  # a directory: keyed by fingerprint
    assert find_schedule(path, "model-A") is not None  # a file
    assert find_schedule(tmp_path, "model-B") is None  # no schedule for this model: defaults
    assert find_schedule(path, "model-B") is None  # calibrated for another model: defaults
    assert find_schedule(None, "model-A") is None


def test_bad_schedule_files_are_named(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="invalid JSON"):
        CodecSchedule.load(bad)
    bad.write_text(json.dumps({"version": 1, "key_bits": [3]}))
    with pytest.raises(ValueError, match="lacks model_fingerprint, value_bits, budget_bits"):
        CodecSchedule.load(bad)
    bad.write_text(json.dumps({"version": 7}))
    with pytest.raises(ValueError, match="version 7"):
        CodecSchedule.load(bad)
    with pytest.raises(FileNotFoundError):
        CodecSchedule.load(tmp_path / "missing.json")


def test_codec_with_schedule_only_changes_packed():
    schedule = _schedule()
    packed = codec_with_schedule("packed", schedule)
    assert packed.config.key_bits == schedule.key_bits and packed.config.value_bits == schedule.value_bits
    wrapped = codec_with_schedule("lz4+packed", schedule)
    assert isinstance(wrapped, Lz4Codec) and wrapped.inner.config == packed.config and wrapped.name == "lz4+packed"
    assert codec_with_schedule("cachegen", schedule).name == "cachegen"
    assert codec_with_schedule("packed", None).config == PackedConfig()


def test_store_tiers_use_the_models_schedule(tmp_path):
    schedule = _schedule()
    schedule.save(schedule_path(tmp_path, "model-A"))
    config = StorageConfig(tiers=(TierConfig("cpu", 1 << 20, codec="packed"),), codec_schedule=str(tmp_path))
    store = build_store(config, model_fingerprint="model-A")
    assert store.tiers[0].codec.config.key_bits == schedule.key_bits
    other = build_store(config, model_fingerprint="model-B")
    assert other.tiers[0].codec.config == PackedConfig()  # falls back to the defaults
    enc = store.tiers[0].codec.encode(make_kv(shape=(2, 4, 16, 2, 8)))
    assert PackedCodec().decode(enc).kv.shape == (2, 4, 16, 2, 8)  # entries carry their bits: any reader decodes
    assert get_codec("packed").name == "packed"


def test_calibrate_cli_rejects_bad_input_before_loading_a_model(capsys):
    from ragkv.cli.main import main

    assert main(["calibrate", "--eval-data", "held_out.json:nope"]) == 2
    assert "PATH:FORMAT" in capsys.readouterr().err
    assert main(["calibrate", "--budget", "1", "--min-bits", "1"]) == 2
    assert "nothing above --min-bits" in capsys.readouterr().err
    assert main(["calibrate", "--curve", "0.5"]) == 2
    assert "--curve budgets" in capsys.readouterr().err
