"""`ragkv calibrate` end to end on the tiny engine: several prompts are measured on the codec's grid
geometry, the schedule fits the budget and keeps that geometry, a store built for the model's fingerprint
encodes with it, and held-out prompts are measured against their own uncompressed blend."""

from __future__ import annotations

import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.compression.schedule import CodecSchedule, schedule_path
from ragkv.eval.calibration import CalibrationPrompt, calibrate, evaluate_codecs
from ragkv.eval.datasets import Sample
from ragkv.storage.build import build_store
from ragkv.storage.config import StorageConfig, TierConfig


def _samples():
    questions = ("Where does the river bend?", "What lines the quartz road?", "What is delta?")
    return [Sample(str(i), q, tuple(PASSAGES), ("",)) for i, q in enumerate(questions)]


def test_calibration_over_several_prompts_sets_the_models_codec(tmp_path):
    torch.manual_seed(0)
    engine = tiny_engine()
    calibration, held_out = _samples()[:2], _samples()[2:]
    prompts = [CalibrationPrompt.of(engine, s, max_tokens=40, chunk_tokens=16) for s in calibration]
    assert all(p.num_tokens <= 40 and all(kv.num_tokens <= 16 for kv in p.kvs) for p in prompts)
    schedule = calibrate(engine, prompts, budget_bits=8.0, bands=2, key_group=(0, 1), value_group=(1, 8))
    measured = schedule.measured
    assert measured["prompts"] == ["0", "1"] and len(measured["sensitivity_excess_kl"]["V"]) == 2
    assert (schedule.key_group, schedule.value_group) == ((0, 1), (1, 8))
    code_bits = (sum(schedule.key_bits) + sum(schedule.value_bits)) / 4
    assert code_bits <= 8.0 - measured["grid_bits"] + 1e-9  # the grids' bits come out of the budget
    assert measured["grid_bits"] > 32 / 8 / 2  # V per token over 8 channels alone: 4 bits/value on V

    schedule.save(schedule_path(tmp_path, engine.model.fingerprint))
    config = StorageConfig(tiers=(TierConfig("cpu", 1 << 20, codec="packed"),), codec_schedule=str(tmp_path))
    codec = build_store(config, engine.model.fingerprint).tiers[0].codec
    assert codec.config == CodecSchedule.load(schedule_path(tmp_path, engine.model.fingerprint)).packed_config()
    assert codec.config.value_group == (1, 8)

    other = [CalibrationPrompt.of(engine, s, max_tokens=40, chunk_tokens=16) for s in held_out]
    rows = evaluate_codecs(other, {"calibrated": codec})
    assert rows[0]["id"] == "2" and rows[0]["uncompressed"]["bits"] == 16.0
    assert 0 < rows[0]["calibrated"]["bits"] < 16 and rows[0]["calibrated"]["kl_mean"] >= 0
    assert other[0].uncompressed[0.15] == (rows[0]["uncompressed"]["kl_mean"], rows[0]["uncompressed"]["top1"])
