"""`ragkv eval`: the evaluation harness on a dataset file, or (`--trace DIR`) a replay of a request trace
against a simulated tiered store; prints markdown tables, writes JSON."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

from ..eval.datasets import FORMATS
from .eval_trace import add_trace_args, run_trace
from .options import add_settings_args, engine_config, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare strategies against a full prefill on a dataset",
        description="Evaluate fusion strategies against a full prefill of the same prompts: "
        "quality (F1, ROUGE-L, KL, top-1) and TTFT, measured side by side.",
    )
    p.add_argument("--data", default=None, help="dataset file (or --trace)")
    p.add_argument("--format", default="jsonl", choices=FORMATS, help="dataset format (default: jsonl)")
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated: full,prefix,naive,cacheblend,epic,cachecraft,focus; cacheblend/cachecraft take a "
        "selection suffix: cacheblend+query picks tokens by the question's attention before layer 0 "
        "(default full,naive,cacheblend and the configured default strategy; with --trace: "
        "prefix,cacheblend@0.15,epic@0.15,cachecraft)",
    )
    p.add_argument(
        "--ratios",
        default="0.15",
        help="comma-separated recompute ratios for the ratio-taking strategies (a cap for adaptive budgets), "
        "e.g. 0,0.05,0.1,0.15,0.25,0.5,1.0 for the budget curve (--curve)",
    )
    p.add_argument("--limit", type=int, default=20, help="number of samples (default 20)")
    p.add_argument(
        "--offset", type=int, default=0, help="skip this many samples first (a long run in parts; default 0)"
    )
    p.add_argument("--max-chunks", type=int, default=None, help="keep at most this many passages per sample")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=24,
        help="greedy answer length for same_answer, agree_prefix, F1 (default 24)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--retrieve",
        type=int,
        default=0,
        metavar="K",
        help="retrieval in the loop: ingest all samples' passages as one corpus, answer each question "
        "over the K chunks retrieved for it (default 0: each sample's own passages)",
    )
    p.add_argument("--tier", default="memory", help="where chunk KV is read from: memory (default) or disk")
    p.add_argument("--codec", default="identity", help="codec for the chunk KV tier (default identity)")
    p.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="processes decoding a CPU-bound codec such as cachegen (default: one per core; 0: inline)",
    )
    p.add_argument(
        "--record-context",
        default="reversed",
        choices=("reversed", "same", "new-first", "served", "none"),
        help="cachecraft's chunk metadata (and KV variants) come from a context pass over the sample's chunks "
        "in this order (default reversed: other neighbours; same: this prompt, an upper bound; new-first: "
        "this prompt without its first chunk; served: no pass, the prompt was served twice before, so the "
        "serving path stored its exact variants; none: nothing)",
    )
    p.add_argument(
        "--craft-variants",
        type=int,
        default=None,
        help="KV variants kept per chunk (blend.craft_variants, default 2): the context pass stores each chunk's "
        "in-context KV and cachecraft loads the closest; 0: no variants",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=None,
        help="neighbour variants (ingestion's default, 2): before timing, each sample's chunks are also stored "
        "after their K nearest passages of the evaluated samples by embedding, as ingestion does over a corpus "
        "(FusionRAG); focus loads them. 0: base entries only",
    )
    add_trace_args(p)
    p.add_argument("--out", default="results.json", help="JSON output path")
    p.add_argument("--plot", default=None, help="write a quality-vs-TTFT plot (PNG)")
    p.add_argument(
        "--curve", default=None, help="write the budget curve (PNG): answer agreement, top-1 and KL per recompute ratio"
    )
    add_settings_args(p, ("craft_variants",), namespace=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.trace is None):
        raise ValueError("give one of --data FILE or --trace DIR")
    if args.trace is not None:
        return run_trace(args)
    import torch

    from ..engine.ingest import IngestConfig
    from ..eval.datasets import load_samples
    from ..eval.report import markdown_table, plot, plot_curve
    from ..eval.runner import parse_specs

    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    settings = settings_of(args)
    names = args.strategies or f"full,naive,cacheblend,{settings.blend.strategy}"
    specs = parse_specs(list(dict.fromkeys(s.strip() for s in names.split(",") if s.strip())), ratios)
    if args.offset < 0:
        raise ValueError(f"--offset must be >= 0, got {args.offset}")
    samples = load_samples(args.data, args.format, args.offset + args.limit, args.max_chunks)[args.offset :]
    if not samples:
        raise ValueError(f"no usable samples in {args.data} (format {args.format})")
    neighbours = IngestConfig.neighbour_variants if args.neighbours is None else args.neighbours
    if neighbours < 0:
        raise ValueError(f"--neighbours must be >= 0 (0: none), got {args.neighbours}")
    with tempfile.TemporaryDirectory(prefix="ragkv-eval-") as scratch:  # `--tier disk`'s store, not kept
        summary, rows = _evaluate(args, settings, samples, specs, neighbours, Path(scratch))
    report = {
        "model": settings.model,
        "dataset": str(args.data),
        "format": args.format,
        "n": len(samples),
        "offset": args.offset,
        "device": settings.device
        if settings.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tier": args.tier,
        "codec": args.codec,
        "decode_workers": args.decode_workers,
        "retrieve_k": args.retrieve,
        "record_context": args.record_context,
        "craft_variants": settings.blend.craft_variants,
        "neighbours": neighbours,
        "results": summary,
        "samples": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown_table(summary))
    if args.plot:
        plot(summary, args.plot, f"{settings.model} on {Path(args.data).name} (n={len(samples)})")
    if args.curve:
        plot_curve(summary, args.curve, f"{settings.model} on {Path(args.data).name} (n={len(samples)})")
    return 0


def _evaluate(args, settings, samples, specs, neighbours: int, scratch: Path):
    """The eval's (summary, rows) over an engine of its own (its `--tier disk` store under `scratch`)."""
    from tqdm import tqdm

    from ..engine.engine import Engine
    from ..engine.prompt import PromptTemplate, template_for
    from ..eval.runner import retrieve_in_the_loop, run_eval

    engine = Engine.from_pretrained(
        config=engine_config(settings_of(args, overrides=_store_overrides(args, settings.device, scratch)))
    )
    engine.template = template_for(args.format) if isinstance(engine.template, PromptTemplate) else engine.template
    if args.record_context != "served":  # every spec reruns the prompt: its later cachecraft rows must not read
        # exact variants the serving path stored after the earlier ones (only `served` measures that)
        engine.config = replace(engine.config, blend=replace(engine.config.blend, craft_serve="off"))
    if args.retrieve:
        samples = retrieve_in_the_loop(engine, samples, args.retrieve)
    try:
        return run_eval(
            engine,
            samples,
            specs,
            args.max_new_tokens,
            progress=lambda xs: tqdm(xs, desc=f"eval {Path(args.data).name}", unit="q"),
            context=args.record_context,
            neighbours=neighbours,
        )
    finally:
        engine.close()


def _store_overrides(args: argparse.Namespace, device: str, scratch: Path) -> dict:
    """`--tier memory|disk --codec NAME`: every chunk is read from that one tier, through that codec (a
    disk tier under `scratch`)."""
    if args.tier not in ("memory", "disk"):
        raise ValueError(f"unknown --tier {args.tier!r}; accepted: memory, disk")
    kind = "disk" if args.tier == "disk" else ("gpu" if device.startswith("cuda") else "cpu")
    out = {
        "storage.tiers": [dict(kind=kind, capacity=64 << 30, codec=args.codec)],
        "storage.decode_workers": args.decode_workers,
    }
    if kind == "disk":
        out["storage.disk_dir"] = str(scratch)
    return out
