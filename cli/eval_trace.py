"""`ragkv eval --trace DIR`: its flags, and the run (replay grid, measured costs, real-run sample)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import settings_of

DEFAULT_TRACE_STRATEGIES = "prefix,cacheblend@0.15,epic@0.15,cachecraft"


def _sizes(text: str) -> list[int]:
    """`"100k,400k,1.6M"` -> token counts."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1].lower(), 1)
        out.append(int(float(item[:-1] if scale > 1 else item) * scale))
    if not out or min(out) <= 0:
        raise ValueError(f"--capacity needs positive token counts, got {text!r}")
    return out


def _split(text: str) -> dict[str, float]:
    """`"gpu=0.1,cpu=0.3,disk=0.6"` -> shares (in tier order, summing to 1)."""
    split = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, share = item.partition("=")
        split[name.strip()] = float(share)
    if not split or abs(sum(split.values()) - 1.0) > 1e-6 or min(split.values()) < 0:
        raise ValueError(f"--tier-split shares must be >= 0 and sum to 1, got {text!r}")
    return split


def add_trace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace replay (--trace)")
    g.add_argument("--trace", default=None, metavar="DIR", help="replay a RAGPulse-format trace directory")
    g.add_argument(
        "--capacity",
        default="50k,200k,800k",
        help="comma-separated store capacities in tokens of KV, k/M suffixes (default 50k,200k,800k)",
    )
    g.add_argument("--policies", default="lru,cost,utility", help="eviction policies (default lru,cost,utility)")
    g.add_argument(
        "--tier-split",
        default="gpu=0.1,cpu=0.3,disk=0.6",
        help="share of the capacity per tier, fastest first (default gpu=0.1,cpu=0.3,disk=0.6)",
    )
    g.add_argument("--costs", default=None, help="per-token costs JSON (default: measured once in this run)")
    g.add_argument("--sample", type=int, default=4, help="requests run for real with the model (default 4)")
    g.add_argument(
        "--sample-max-tokens",
        type=int,
        default=1024,
        help="largest sampled prompt: passages, history and user input (default 1024)",
    )
    g.add_argument(
        "--craft-alpha", type=float, default=0.15, help="cachecraft: alpha of min(1, alpha CCI (1-ov)), default 0.15"
    )
    g.add_argument("--cci", type=float, default=1.0, help="cachecraft: CCI of every chunk (default 1.0)")
    g.add_argument("--max-variants", type=int, default=2, help="cachecraft: variants held per chunk (default 2)")
    g.add_argument("--trace-limit", type=int, default=None, help="replay only the first N requests")


def run_trace(args: argparse.Namespace) -> int:
    from ..eval.trace_eval import grid_table, run_trace_eval, sample_table
    from ..eval.trace_replay import parse_sim_strategies

    strategies = parse_sim_strategies(args.strategies or DEFAULT_TRACE_STRATEGIES)
    capacities = _sizes(args.capacity)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    from ..storage.policy import POLICIES

    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"unknown eviction policy {unknown}; accepted: {', '.join(POLICIES)}")
    split = _split(args.tier_split)
    engine = None
    if args.sample > 0 or args.costs is None:
        engine = _engine(args)
    if args.costs is not None:
        from ..eval.trace_costs import load_costs

        costs = load_costs(args.costs)
    else:
        from ..eval.trace_costs import measure_costs
        from ..eval.trace_sample import corpus_ids

        def costs():
            return measure_costs(engine, corpus_ids(engine))

    report = run_trace_eval(
        args.trace,
        capacities,
        policies,
        strategies,
        costs,
        split,
        args.craft_alpha,
        args.cci,
        args.max_variants,
        args.sample,
        args.sample_max_tokens,
        engine,
        args.trace_limit,
        progress=_progress,
    )
    Path(args.out).write_text(json.dumps(report, indent=1))
    c = report["costs"]
    print(
        f"{report['requests']} requests, {report['prompt_tokens_mean']:.0f} prompt tokens each on average; costs "
        f"({c['source']}): prefill {c['prefill_ms_per_token']:.4f} ms/token, load "
        + ", ".join(f"{t} {v:.5f}" for t, v in c["load_ms_per_token"].items())
        + " ms/token"
    )
    print(grid_table(report))
    if "sample" in report:
        print(f"\nreal-run sample: requests {report['sample']['requests']}")
        print(sample_table(report["sample"]))
    return 0


def _progress(items):
    from tqdm import tqdm

    return tqdm(items, desc="real-run sample", unit="request")


def _engine(args: argparse.Namespace):
    """The model and a memory-only store (the sample's chunk KV is all in RAM, as `eval --tier memory`)."""
    import torch

    from .options import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_of(args)
    kind = "gpu" if settings.device.startswith("cuda") else "cpu"
    overrides = {"storage.tiers": [dict(kind=kind, capacity=64 << 30, codec="identity")]}
    return load_engine(settings_of(args, overrides=overrides))
