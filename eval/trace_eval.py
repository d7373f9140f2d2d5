"""`ragkv eval --trace DIR`: the replay grid (eviction policy x capacity x strategy over every request),
the real-run sample, and the printed tables (the JSON report is the dict `run_trace_eval` returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .trace import load_trace
from .trace_replay import ReplayConfig, SimStrategy, TraceCosts, replay


def run_trace_eval(
    trace_dir: str,
    capacities: Sequence[int],
    policies: Sequence[str],
    strategies: Sequence[SimStrategy],
    costs: TraceCosts | Callable[[], TraceCosts],
    split: dict[str, float],
    craft_alpha: float = 0.15,
    cci: float = 1.0,
    max_variants: int = 2,
    sample: int = 0,
    sample_max_tokens: int = 1024,
    engine=None,
    limit: int | None = None,
    progress: Callable | None = None,
) -> dict:
    """Replay the trace for every (policy, capacity, strategy); then, with an engine, run `sample`
    requests for real. `costs` may be a callable (measured only when needed, after parsing the trace).
    The real-run sample's cachecraft budgets come from the replay at the largest capacity under the
    first policy."""
    requests = load_trace(trace_dir, limit)
    costs = costs() if callable(costs) else costs
    picked = []
    if sample and engine is not None:
        from .trace_sample import choose_sample

        picked = choose_sample(requests, sample, sample_max_tokens)
    grid = []
    kept = {}
    for policy in policies:
        for capacity in capacities:
            config = ReplayConfig(capacity, policy, dict(split), craft_alpha, cci, max_variants)
            for strategy in strategies:
                keep = picked if (policy, capacity) == (policies[0], max(capacities)) else ()
                summary, outcomes = replay(requests, strategy, config, costs, keep)
                if strategy.name == "cachecraft" and keep:
                    kept = outcomes
                grid.append({"policy": policy, "capacity_tokens": capacity, "strategy": strategy.label, **summary})
    report = {
        "trace": str(trace_dir),
        "requests": len(requests),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in requests) / max(len(requests), 1),
        "distinct_passage_tokens": sum({p.id: p.tokens for r in requests for p in r.passages}.values()),
        "tier_split": dict(split),
        "costs": costs.to_dict(),
        "cachecraft": {"alpha": craft_alpha, "cci": cci, "max_variants": max_variants},
        "grid": grid,
    }
    if picked:
        from .trace_sample import run_sample

        report["sample"] = run_sample(engine, requests, picked, kept, strategies, craft_alpha, cci, progress)
    return report


def grid_table(report: dict) -> str:
    """One row per (policy, capacity, strategy): token hit rate per tier, recompute per request, TTFT."""
    head = (
        "| policy | capacity (tokens) | strategy | hit gpu | hit cpu | hit disk | hit total | chunk hit | "
        "recomputed prompt tok/req | recomputed chunk tok/req | fixed in hit chunks tok/req | "
        "TTFT mean ms | TTFT p50 ms | variants held at hit (1 / 2) | mean overlap |"
    )
    lines = [head, "|---" * 15 + "|"]
    for row in report["grid"]:
        hr = row["token_hit_rate"]
        variants = row["variant_hits"]
        held = f"{variants.get('1', 0)} / {variants.get('2', 0)}" if variants else "-"
        ov = f"{row['mean_overlap']:.3f}" if variants else "-"
        lines.append(
            f"| {row['policy']} | {row['capacity_tokens']:,} | {row['strategy']} | {hr['gpu']:.3f} | {hr['cpu']:.3f} "
            f"| {hr['disk']:.3f} | {row['token_hit_rate_total']:.3f} | {row['chunk_hit_rate']:.3f} | "
            f"{row['recomputed_prompt_tokens_per_request']:.0f} | {row['recomputed_chunk_tokens_per_request']:.0f} | "
            f"{row['fixed_chunk_tokens_per_request']:.0f} | "
            f"{row['ttft_ms_mean']:.0f} | {row['ttft_ms_p50']:.0f} | {held} | {ov} |"
        )
    return "\n".join(lines)


def sample_table(sample: dict) -> str:
    """The real-run sample: fidelity to the full prefill and recompute share per strategy."""
    lines = [
        "| strategy | kl_mean | top-1 | recompute fraction | TTFT median ms | prompt tokens |",
        "|---" * 6 + "|",
    ]
    for label, row in sample["results"].items():
        lines.append(
            f"| {label} | {row['kl_mean']:.4f} | {row['top1_agreement']:.3f} | {row['recompute_fraction']:.3f} | "
            f"{row['ttft_ms_median']:.0f} | {row['prompt_tokens_mean']:.0f} |"
        )
    return "\n".join(lines)
