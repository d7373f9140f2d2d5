"""The evaluation harness: dataset readers, metrics, spec parsing and the report (no model needed)."""

import json

import pytest
import torch

from ragkv.eval.datasets import load_samples
from ragkv.eval.metrics import (
    agree_prefix,
    f1,
    first_difference,
    kl_per_position,
    normalize_answer,
    rouge_l,
    same_answer,
    top1_agreement,
)
from ragkv.eval.report import curve_points, markdown_table, plot_curve
from ragkv.eval.runner import parse_specs, summarize


def test_jsonl_reader_limits_and_caps_chunks(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"id": f"q{i}", "question": f"q{i}?", "chunks": ["a", "b", "c"], "answers": ["x"]} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_samples(path, "jsonl", limit=2, max_chunks=2)
    assert [s.id for s in samples] == ["q0", "q1"] and samples[0].chunks == ("a", "b")


def test_readers_reject_bad_files_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "chunks": ["a"]}\n')
    with pytest.raises(ValueError, match="missing field\\(s\\) answers"):
        load_samples(bad, "jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: invalid JSON"):
        load_samples(broken, "jsonl")
    with pytest.raises(ValueError, match="unknown dataset format 'csv'; accepted: jsonl, musique"):
        load_samples(bad, "csv")
    notlist = tmp_path / "m.json"
    notlist.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_samples(notlist, "musique")
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.json", "musique")


def test_cacheblend_reader_flattens_nested_answers(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(
        json.dumps(
            [
                {
                    "ctxs": [{"title": "", "text": "t1"}, {"title": "T", "text": "t2"}],
                    "question": "q?",
                    "answers": [["Croatia", "HR"]],
                }
            ]
        )
    )
    (sample,) = load_samples(path, "wikimqa")
    assert sample.answers == ("Croatia", "HR") and sample.chunks == ("t1", "T\n\nt2")


def test_answer_metrics():
    assert normalize_answer("The  Exeter College!") == "exeter college"
    assert f1("Exeter College", ["exeter college"]) == 1.0
    assert f1("at Exeter", ["Exeter College"]) == pytest.approx(2 * 0.5 * 0.5 / 1.0)
    assert f1("Oxford", ["Exeter College"]) == 0.0
    assert rouge_l("the cat sat", ["the cat sat"]) == 1.0 and rouge_l("dog", ["the cat sat"]) == 0.0


def test_distribution_metrics():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert torch.allclose(kl_per_position(ref, ref), torch.zeros(2), atol=1e-7)
    other = torch.tensor([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]])
    kl = kl_per_position(ref, other)
    assert kl[0] > 0.5 and abs(float(kl[1])) < 1e-7
    assert top1_agreement(ref, other) == 0.5


def test_specs_and_summary_table():
    specs = parse_specs(["naive", "cacheblend", "epic"], [0.1, 0.2])
    assert [s.label for s in specs] == ["full", "naive", "cacheblend@0.1", "cacheblend@0.2", "epic@0.1", "epic@0.2"]
    row = {
        "strategy": "naive",
        "ratio": 0.0,
        "same_answer": 1.0,
        "agree_prefix": 1.0,
        "f1_vs_full": 1.0,
        "same_answer_unguarded": 0.0,
        "agree_prefix_unguarded": 0.5,
        "exact_switch": 1.0,
        "guard_ms": 5.0,
        "ttft_ms": 10.0,
        "speedup_vs_full": 2.0,
        "speedup_vs_hf": 1.5,
        "hf_ttft_ms": 15.0,
        "f1": 1.0,
        "rouge_l": 1.0,
        "kl_first_token": 0.1,
        "kl_mean": 0.2,
        "top1_agreement": 1.0,
        "rouge_l_vs_full": 1.0,
        "recompute_fraction": 0.2,
        "recomputed_chunk_tokens": 16.0,
        "variants_used": 0,
        "prompt_tokens": 100,
    }
    summary = summarize(
        [{"naive": row}, {"naive": {**row, "ttft_ms": 30.0, "speedup_vs_full": 4.0, "speedup_vs_hf": 0.5}}]
    )
    assert summary["naive"]["ttft_ms_median"] == 20.0 and summary["naive"]["speedup_vs_full"] == 3.0
    assert summary["naive"]["speedup_vs_hf"] == 1.0 and summary["naive"]["hf_ttft_ms_median"] == 15.0
    assert "| naive |" in markdown_table(summary)
    assert summary["naive"]["same_answer"] == 1.0 and summary["naive"]["strategy"] == "naive"
    assert summary["naive"]["same_answer_unguarded"] == 0.0 and summary["naive"]["exact_switch"] == 1.0


def test_one_strategy_parser_and_label_for_the_blend_the_eval_and_the_trace():
    from ragkv.blend import BlendConfig, make_strategy
    from ragkv.blend.config import parse_strategy, strategy_label
    from ragkv.eval.runner import Spec
    from ragkv.eval.trace_replay import parse_sim_strategies

    assert parse_strategy("cacheblend+query@0.15") == ("cacheblend+query", 0.15)
    assert parse_strategy(" naive ") == ("naive", None)
    for bad, why in (("magic@0.1", "unknown strategy"), ("epic@x", "must be a number"), ("epic@1.5", "within")):
        with pytest.raises(ValueError, match=why):
            parse_strategy(bad)
    for text in ("full", "naive", "cacheblend@0.15", "cacheblend+query@0.2", "epic@0.5", "cachecraft+query@0.1"):
        name, ratio = parse_strategy(text)
        assert strategy_label(name, ratio) == text
        assert make_strategy(name, ratio or 0.0, BlendConfig()).label == text
        assert Spec(name, ratio or 0.0).label == text
    assert [s.label for s in parse_sim_strategies("prefix,cacheblend@0.15,epic@0.2,cachecraft")] == [
        "prefix",
        "cacheblend@0.15",
        "epic@0.2",
        "cachecraft",
    ]
    with pytest.raises(ValueError, match="takes no recompute ratio"):
        parse_sim_strategies("cachecraft@0.2")


def test_answer_agreement_metrics():
    assert agree_prefix([5, 6, 7, 8], [5, 6, 9, 8]) == 0.5
    assert agree_prefix([5, 6], [5, 6, 7]) == 1.0 and agree_prefix([5, 6], []) == 0.0
    assert agree_prefix([], []) == 1.0 and agree_prefix([], [3]) == 0.0
    assert same_answer([5, 6], [5, 6]) and not same_answer([5, 6], [5, 6, 7])
    assert first_difference([5, 6, 7], [5, 9, 7]) == 1 and first_difference([5, 6], [5, 6]) is None
    assert first_difference([5, 6], [5, 6, 7]) == 2 and first_difference([5, 6], [5]) == 1


def test_budget_curve_is_drawn_per_strategy_over_the_fraction_used(tmp_path):
    def row(strategy, ratio, fraction, same):
        metrics = dict(same_answer=same, agree_prefix=same, top1_agreement=0.9, kl_mean=0.1)
        return dict(strategy=strategy, ratio=ratio, recompute_fraction=fraction, **metrics)

    summary = {
        "full": row("full", 0.0, 1.0, 1.0),
        "naive": row("naive", 0.0, 0.0, 0.2),
        "focus@0.5": row("focus", 0.5, 0.31, 0.8),
        "focus@0.1": row("focus", 0.1, 0.1, 0.5),
        "cacheblend@0.1": row("cacheblend", 0.1, 0.13, 0.3),
    }
    points = curve_points(summary)
    assert sorted(points) == ["cacheblend", "focus"]
    assert [(x, r["same_answer"]) for x, r in points["focus"]] == [(0.1, 0.5), (0.31, 0.8)]
    plot_curve(summary, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
