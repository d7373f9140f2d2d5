"""`ragkv calibrate`: pick the `packed` codec's bits per band of layers (K and V) for one model and a
bits/value budget, from how much its answers suffer on a few prompts; stores the schedule under the
data directory keyed by the model fingerprint (a store with `codec_schedule` set reads it there).
Optionally measures the schedule on other prompts (`--eval-data`), never the calibration ones.
`--gate` runs the answer gate instead (cli/gate.py): which codecs change no answer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..eval.datasets import FORMATS
from .gate import add_gate_arguments, run_gate_command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the packed codec's bits per layer band to a model and a bits/value budget",
        description="Measure how sensitive a model is to quantized K and V per band of layers (cacheblend "
        "kl_mean against the full prefill) and store the bits per band that fit a bits/value budget.",
    )
    p.add_argument("--data", default=None, help="dataset file to calibrate on (default: the shipped demo documents)")
    p.add_argument("--format", default="musique", choices=FORMATS, help="its format (default musique)")
    p.add_argument("--limit", type=int, default=2, help="prompts to calibrate on (default 2)")
    p.add_argument("--max-chunks", type=int, default=None, help="keep at most this many passages per prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="keep passages while their tokens fit this (all)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="cut each passage to this many tokens (no cut)")
    p.add_argument(
        "--key-group",
        default="0x1",
        help="K scale groups TOKENSxCHANNELS (0 tokens: all the chunk's; default 0x1, per channel)",
    )
    p.add_argument("--value-group", default="0x1", help="V scale groups TOKENSxCHANNELS (default 0x1)")
    p.add_argument("--budget", type=float, default=2.5, help="bits/value, codes and grids (default 2.5)")
    p.add_argument(
        "--bands",
        default="6",
        help="N equal bands of layers, or each band's first layer, e.g. 0,1,2,6,12,18,24 (bits then per layer; "
        "default 6)",
    )
    p.add_argument("--probe-bits", type=int, default=2, help="bits each band is probed at (default 2)")
    p.add_argument(
        "--min-bits",
        type=float,
        default=2,
        help="fewest bits any band gets (default 2: bands harmless at 2 bits were not at 1, docs/BENCHMARKS.md)",
    )
    p.add_argument(
        "--quantum",
        type=float,
        default=None,
        help="bits per band in steps of this (default 0.25 with per-channel grids: packed format 2's fractional "
        "mean widths; 1 otherwise)",
    )
    p.add_argument("--ratio", type=float, default=0.15, help="cacheblend recompute ratio (default 0.15)")
    p.add_argument("--model", default="smollm2", help="model alias, local path or cached HF id")
    p.add_argument("--data-dir", default=None, help="where schedules live (default: RAGKV_DATA_DIR or ~/.cache/ragkv)")
    p.add_argument("--out", default=None, help="schedule file (default: DATA_DIR/calibration/<model key>.json)")
    p.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="PATH:FORMAT",
        help="held-out prompts to measure the schedule on (repeatable), e.g. wikimqa.json:wikimqa",
    )
    p.add_argument("--eval-limit", type=int, default=2, help="prompts per --eval-data file (default 2)")
    p.add_argument("--eval-max-chunks", type=int, default=None, help="passages per held-out prompt")
    p.add_argument(
        "--curve",
        default="",
        help="comma-separated further budgets whose schedules are also measured on --eval-data (rate-distortion)",
    )
    p.add_argument("--compare", default="cachegen", help="comma-separated codecs measured beside (default cachegen)")
    p.add_argument("--report", default=None, help="write the held-out measurement as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_gate_arguments(p)
    p.set_defaults(func=run)


def demo_samples():
    """The shipped demo questions, each over all the shipped documents."""
    from ..eval.datasets import Sample
    from .demo import shipped_demo

    paths, questions = shipped_demo()
    docs = tuple(Path(p).read_text() for p in paths)
    return [Sample(q["id"], q["question"], docs, tuple(q["answers"])) for q in questions]


def parse_eval_data(spec: str) -> tuple[str, str]:
    path, sep, fmt = spec.rpartition(":")
    if not sep or fmt not in FORMATS:
        raise ValueError(f"--eval-data takes PATH:FORMAT with FORMAT one of {', '.join(FORMATS)}; got {spec!r}")
    return path, fmt


def parse_bands(spec: str) -> int | list[int]:
    try:
        bands = [int(b) for b in spec.split(",")]
    except ValueError:
        raise ValueError(f"--bands takes N or first layers like 0,1,2,6; got {spec!r}") from None
    if len(bands) == 1:
        if bands[0] < 1:
            raise ValueError(f"--bands needs at least 1 band; got {spec!r}")
        return bands[0]
    if bands[0] != 0 or any(a >= b for a, b in zip(bands, bands[1:])):
        raise ValueError(f"--bands first layers must start at 0 and increase; got {spec!r}")
    return bands


def parse_group(spec: str) -> tuple[int, int]:
    tokens, sep, channels = spec.partition("x")
    if not sep or not tokens.isdigit() or not channels.isdigit() or int(channels) < 1:
        raise ValueError(f"a scale group is TOKENSxCHANNELS (e.g. 0x1, 1x64); got {spec!r}")
    return int(tokens), int(channels)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..compression import get_codec
    from ..compression.packed import PackedCodec
    from ..compression.schedule import schedule_path
    from ..engine.config import EngineConfig
    from ..engine.engine import Engine
    from ..eval.calibration import CalibrationPrompt, calibrate, evaluate_codecs, schedule_for_budget
    from ..eval.datasets import load_samples
    from ..storage.config import StorageConfig, TierConfig

    held_out = [parse_eval_data(s) for s in args.eval_data]  # bad specs fail before any model work
    if args.gate:
        return run_gate_command(args, held_out, demo_samples)
    if args.budget <= args.min_bits:
        raise ValueError(f"--budget {args.budget} leaves nothing above --min-bits {args.min_bits}")
    groups = (parse_group(args.key_group), parse_group(args.value_group))
    per_channel = groups == ((0, 1), (0, 1))
    quantum = args.quantum or (0.25 if per_channel else 1.0)
    if quantum != 1 and not per_channel:
        raise ValueError(f"--quantum {quantum:g}: fractional bits need per-channel grids (0x1, packed format 2)")
    bands = parse_bands(args.bands)
    curve = [float(b) for b in args.curve.split(",") if b.strip()]
    if curve and min(curve) <= args.min_bits:
        raise ValueError(f"--curve budgets must exceed --min-bits {args.min_bits}; got {curve}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    samples = load_samples(args.data, args.format, args.limit, args.max_chunks) if args.data else demo_samples()
    if not samples:
        raise ValueError(f"no usable samples in {args.data} (format {args.format})")
    config = EngineConfig.load(data_dir=args.data_dir)  # None: the environment, file or default
    engine = Engine.from_pretrained(args.model, storage=StorageConfig(tiers=(TierConfig("cpu", 1 << 30),)))
    prompts = [CalibrationPrompt.of(engine, s, args.max_tokens, args.chunk_tokens) for s in samples[: args.limit]]
    schedule = calibrate(
        engine, prompts, args.budget, bands, args.probe_bits, args.min_bits, args.ratio, print, *groups, quantum
    )
    out = Path(args.out) if args.out else schedule_path(Path(config.data_dir) / "calibration", engine.model.fingerprint)
    schedule.save(out)
    print(f"K bits per band {list(schedule.key_bits)}, V bits {list(schedule.value_bits)} -> {out}")
    if held_out:
        codecs = {n: get_codec(n) for n in args.compare.split(",") if n.strip()}
        codecs["packed (defaults)"] = PackedCodec()
        for budget in [args.budget, *curve]:
            other = schedule_for_budget(schedule.model_fingerprint, schedule.measured, budget)
            label = f"packed calibrated @{budget:g} K{list(other.key_bits)} V{list(other.value_bits)}"
            codecs[label] = PackedCodec(other.packed_config())
        report = {"schedule": json.loads(schedule.to_json()), "held_out": {}}
        for path, fmt in held_out:
            others = load_samples(path, fmt, args.eval_limit, args.eval_max_chunks)
            prepared = [CalibrationPrompt.of(engine, s, args.max_tokens, args.chunk_tokens) for s in others]
            if {p.sample_id for p in prepared} & {p.sample_id for p in prompts} and path == args.data:
                raise ValueError(f"--eval-data {path} shares prompts with the calibration: skip them (other records)")
            rows = evaluate_codecs(prepared, codecs, args.ratio)
            report["held_out"][f"{path}:{fmt}"] = rows
            print(json.dumps(rows), flush=True)
            base = sum(r["uncompressed"]["kl_mean"] for r in rows) / len(rows)
            for name in codecs:
                kl = sum(r[name]["kl_mean"] for r in rows) / len(rows)
                bits = sum(r[name]["bits"] for r in rows) / len(rows)
                print(
                    f"{Path(path).name}: {name}: {bits:.3f} bits/value, "
                    f"kl_mean {kl:.4f} = {kl / base:.2f}x uncompressed"
                )
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
    return 0
