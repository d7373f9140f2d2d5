"""APE-style shared prefix, training-free: each chunk's KV computed after the prompt's fixed prefix (chat
template + instruction, the same for every question of a template) instead of after the sink alone
(`chunk_context = "prefix"`, the default since this experiment), with and without the first chunk marked
exact (its KV is then the full prefill's rows: the budget goes to the other chunks).

Per sample, both kinds of chunk KV (fp32, computed here, not read from the store) are fused with the same
strategies; same_answer / agree_prefix over the full prefill's greedy answer (`--new-tokens`, 24) and
kl_mean teacher-forced along it. References are cached as experiments/answer_turns.py does (`--cache`).

    python experiments/shared_prefix.py --demo --cache /tmp/refs
    python experiments/shared_prefix.py --data ../shared/data/cacheblend/musique_s.json --format musique --limit 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from answer_turns import add_sample_args, engine_and_samples, reference

from ragkv.blend import BlendConfig, blend, make_strategy
from ragkv.chunk_cache import precompute_many
from ragkv.engine.engine import Engine
from ragkv.eval.metrics import agree_prefix, kl_per_position, top1_agreement
from ragkv.eval.runner import sample_chunks

VARIANTS = (
    ("naive", "naive", 0.0, BlendConfig()),
    ("focus@0.15", "focus", 0.15, BlendConfig()),
    ("focus@0.15-fixed", "focus", 0.15, BlendConfig(focus_mass=0.0)),
    ("focus@0.25", "focus", 0.25, BlendConfig()),
    ("focus@0.3-mass0.9", "focus", 0.3, BlendConfig(focus_mass=0.9)),
    ("cacheblend@0.15", "cacheblend", 0.15, BlendConfig()),
)


def kinds(engine: Engine, plan, chunks):
    """(label, plan, sources): chunk KV after the sink; after the prompt's prefix (the engine's lead-in,
    `chunk_context = "prefix"`) with the first chunk marked exact as `Engine.plan` does, and without."""
    spans = [s for s, _ in plan.chunk_spans]
    sink = list(zip(spans, precompute_many(engine.model, chunks)))
    lead = list(zip(spans, precompute_many(engine.model, chunks, lead_in=plan.prefix_ids)))
    return (
        ("sink", plan.with_exact([]), sink),
        ("prefix", plan.with_exact([]), lead),
        ("prefix+exact", plan.with_exact([0]), lead),
    )


def fidelity(engine: Engine, plan, strategy, sources, ref: dict, new_tokens: int) -> dict:
    """One fusion of `plan` against the full prefill's reference `ref` (experiments/answer_turns.py):
    its greedy answer (same, agreeing prefix) and the teacher-forced kl_mean / top-1 along ref's answer."""
    result = blend(engine.model, plan, strategy, sources, reserve=new_tokens + 1)
    answer = list(engine.answer_ids(result, new_tokens))
    logits = engine.teacher_forced_logits(result, torch.tensor(ref["answer"]))
    return {
        "same_answer": float(answer == ref["answer"]),
        "agree_prefix": agree_prefix(ref["answer"], answer),
        "kl_mean": float(kl_per_position(ref["logits"], logits).mean()),
        "top1": top1_agreement(ref["logits"], logits),
        "recompute_fraction": result.recompute_fraction,
    }


def tally(totals: dict[str, dict[str, list[float]]], name: str, metrics: dict) -> None:
    """Adds one sample's `fidelity` metrics to the row `name` ("kind label") of `totals`."""
    for metric, value in metrics.items():
        totals.setdefault(name, {}).setdefault(metric, []).append(value)


def report(rows: list[dict], totals: dict[str, dict[str, list[float]]], args) -> None:
    """The table of `totals` on stdout, and the per-sample `rows` as JSON in `args.out`."""
    print_table(totals)
    Path(args.out).write_text(json.dumps({"data": "demo" if args.demo else args.data, "rows": rows}, indent=1))


def print_table(totals: dict[str, dict[str, list[float]]]) -> None:
    """The mean of each "kind label" row's `fidelity` metrics, as a markdown table."""
    print("| chunk KV computed after | strategy | same answer | agree prefix | kl_mean | top-1 | recompute |")
    print("|---|---|---|---|---|---|---|")
    for k, t in totals.items():
        kind, label = k.split(" ", 1)
        n = len(t["same_answer"])
        mean = {m: sum(v) / n for m, v in t.items()}
        print(
            f"| {kind} | {label} | {int(sum(t['same_answer']))}/{n} | {mean['agree_prefix']:.3f} | "
            f"{mean['kl_mean']:.4f} | {mean['top1']:.3f} | {mean['recompute_fraction']:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_args(ap, limit=3)
    ap.add_argument("--out", default="shared_prefix.json")
    ap.add_argument("--only", default="", help="comma-separated 'kind label' pairs to run (default: all)")
    args = ap.parse_args()
    engine, samples = engine_and_samples(args)
    rows, totals = [], {}
    for sample in samples:
        chunks = sample_chunks(engine, sample)
        plan = engine.plan(sample.question, chunks)
        ref = reference(engine, plan, args.new_tokens, args.cache)
        row = {"id": sample.id}
        for kind, kind_plan, sources in kinds(engine, plan, chunks):
            for label, name, ratio, config in VARIANTS:
                if args.only and f"{kind} {label}" not in args.only.split(","):
                    continue
                m = fidelity(engine, kind_plan, make_strategy(name, ratio, config), sources, ref, args.new_tokens)
                row[f"{kind} {label}"] = m
                tally(totals, f"{kind} {label}", m)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, totals, args)


if __name__ == "__main__":
    main()
