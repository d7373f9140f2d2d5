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
from ragkv.storage.build import build_store
from ragkv.storage.config import StorageConfig, TierConfig

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


def test_fractional_allocation_steps_by_the_quantum_and_schedules_keep_it():
    key_bits, value_bits = allocate_bits(SENSITIVITY, code_bits=2.5, probe_bits=2, min_bits=1.5, quantum=0.25)
    assert sum(key_bits) + sum(value_bits) == pytest.approx(20)  # 2.5 bits x 8 slots, in quarter bits
    assert all((4 * b).is_integer() and b >= 1.5 for b in key_bits + value_bits)
    assert key_bits[2] == max(key_bits) and value_bits[3] == 1.5
    measured = {"sensitivity_excess_kl": SENSITIVITY, "probe_bits": 2, "min_bits": 2, "grid_bits": 0.1, "quantum": 0.25}
    schedule = schedule_for_budget("model-A", measured, 2.6)
    assert any(not float(b).is_integer() for b in schedule.key_bits + schedule.value_bits)
    assert schedule.packed_config().format == 2
    with pytest.raises(ValueError, match="quantum"):
        allocate_bits(SENSITIVITY, code_bits=2.5, quantum=0)


def test_schedules_with_fractional_bits_round_trip(tmp_path):
    measured = {"sensitivity_excess_kl": SENSITIVITY, "probe_bits": 2, "min_bits": 2, "grid_bits": 0.1, "quantum": 0.25}
    schedule = schedule_for_budget("model-A", measured, 2.6)
    loaded = CodecSchedule.load(schedule.save(tmp_path / "s.json"))
    assert loaded.key_bits == schedule.key_bits and loaded.value_bits == schedule.value_bits
    assert codec_with_schedule("packed", loaded).config == schedule.packed_config()


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
    assert main(["calibrate", "--bands", "1,0,4"]) == 2
    assert "start at 0 and increase" in capsys.readouterr().err
    assert main(["calibrate", "--value-group", "1x"]) == 2
    assert "TOKENSxCHANNELS" in capsys.readouterr().err


def test_schedule_keeps_its_grid_geometry_and_older_files_load_per_channel(tmp_path):
    measured = {
        "sensitivity_excess_kl": SENSITIVITY,
        "probe_bits": 2,
        "min_bits": 1,
        "grid_bits": 0.2,
        "key_group": [64, 1],
        "value_group": [1, 16],
    }
    schedule = schedule_for_budget("model-A", measured, 2.5)
    loaded = CodecSchedule.load(schedule.save(tmp_path / "s.json"))
    groups = (64, 1), (1, 16)  # not per channel: format 1's geometry
    assert loaded.packed_config() == PackedConfig(schedule.key_bits, schedule.value_bits, *groups, format=1)
    assert codec_with_schedule("packed", loaded).config.value_group == (1, 16)
    raw = json.loads((tmp_path / "s.json").read_text())
    del raw["key_group"], raw["value_group"]  # a schedule written before the geometry was stored
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = CodecSchedule.load(tmp_path / "old.json")
    assert (old.key_group, old.value_group) == ((0, 1), (0, 1)) and old.key_bits == schedule.key_bits


def test_grid_bits_count_one_fp16_pair_per_scale_group():
    from ragkv.eval.calibration import CalibrationPrompt, truncate_chunks

    prompt = CalibrationPrompt(None, "s", None, [make_kv(shape=(2, 3, 64, 2, 8))], None, None)
    assert prompt.num_tokens == 64
    assert prompt.grid_bits(format=1) == pytest.approx(32 / 64)  # per channel over 64 tokens, K and V alike
    assert prompt.grid_bits() == pytest.approx((32 * 16 + 16 * 17 + 8) / (64 * 16))  # format 2: + int16 [C + 1]
    assert prompt.grid_bits((0, 1), (1, 16)) == pytest.approx((32 / 64 + 32 / 16) / 2)  # V per token (16 channels)
    assert prompt.grid_bits((32, 1), (0, 1)) == pytest.approx((32 / 32 + 32 / 64) / 2)
    chunks = [list(range(10)), list(range(5)), list(range(7))]
    assert truncate_chunks(chunks, max_tokens=16, chunk_tokens=8) == [list(range(8)), list(range(5))]
    assert truncate_chunks(chunks, max_tokens=4) == [list(range(4))]  # the first chunk always stays, cut to fit
    assert truncate_chunks(chunks) == chunks


def test_unequal_bands_weigh_by_layers_and_come_out_per_layer():
    from ragkv.eval.calibration import per_layer_bits

    edges = [0, 1, 2, 6]  # layer 0, layer 1, layers 2-5, layers 6-9
    assert [band_layers(b, edges, 10) for b in range(4)] == [[0], [1], [2, 3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="band edges"):
        band_layers(0, [1, 4], 10)
    sensitivity = {"K": [0.0, 0.05, 0.01, 0.01], "V": [0.0, 0.2, 0.01, 0.01]}
    measured = {"sensitivity_excess_kl": sensitivity, "probe_bits": 2, "min_bits": 1, "grid_bits": 0.0}
    schedule = schedule_for_budget("m", {**measured, "bands": edges, "num_layers": 10}, 2.5)
    assert len(schedule.key_bits) == len(schedule.value_bits) == 10  # one entry per layer
    assert (sum(schedule.key_bits) + sum(schedule.value_bits)) / 20 <= 2.5  # the budget counts layers, not bands
    assert schedule.key_bits[0] == schedule.value_bits[0] == 1  # a layer measured harmless: the minimum
    assert schedule.value_bits[1] == max(schedule.value_bits)  # one sensitive layer: bits are cheap there
    assert schedule.value_bits[1] > schedule.value_bits[2]
    assert per_layer_bits((5, 3, 2, 1), edges, 10) == (5, 3, 2, 2, 2, 2, 1, 1, 1, 1)
    assert PackedConfig(schedule.key_bits).bits(1, 10)[0] == schedule.key_bits[1]  # 10 bands of 10 layers: per layer
