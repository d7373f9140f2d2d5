"""`ragkv calibrate --gate`: the answer gate (eval/codec_gate.py) over an eval set, one table per data
set, and whether every tier's default codec passes it (exit status 1 when one does not).

The lossy codecs it measures beside the defaults (cachegen, packed at ~2.5 bits/value) are opt-in: the
table is their answer cost (how many greedy answers they change, how much kl they add)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

GATE_CODECS = "lz4,int8,fp8,cachegen,packed"  # measured by default beside the uncompressed reference


def tier_default_codecs() -> dict[str, str]:
    """Tier -> the codec it stores entries with when nothing is configured (engine/settings.py)."""
    from ..engine.config import EngineConfig
    from ..engine.settings import StorageSettings

    defaults = {t.kind: t.codec for t in EngineConfig().storage_config().tiers}
    defaults["redis"] = StorageSettings().redis_codec
    return defaults


def gate_codecs(names: str, schedule_dir: Path, fingerprint: str) -> dict:
    """Label -> codec for `names` (comma-separated), and the calibrated `packed` when a schedule exists."""
    from ..compression import codec_names, get_codec
    from ..compression.schedule import codec_with_schedule, find_schedule

    known = set(codec_names())
    codecs = {n: get_codec(n) for n in (n.strip() for n in names.split(",")) if n and n in known}
    unknown = [n for n in names.split(",") if n.strip() and n.strip() not in known]
    if unknown:
        raise ValueError(f"--gate-codecs: unknown {unknown}; known: {', '.join(sorted(known))}")
    schedule = find_schedule(schedule_dir, fingerprint) if schedule_dir.is_dir() else None
    if schedule is not None and "packed" in codecs:
        codecs[f"packed calibrated @{schedule.budget_bits:g}"] = codec_with_schedule("packed", schedule)
    return codecs


def run_gate_command(args: argparse.Namespace, sets: list[tuple[str, str]], demo_samples: Callable) -> int:
    """The gate on each (path, format) of `sets` (none: `--data`, else `demo_samples()`)."""
    import torch

    from ..engine.config import EngineConfig
    from ..engine.engine import Engine
    from ..eval.codec_gate import GatePrompt, gate_table, run_gate
    from ..eval.datasets import load_samples
    from ..storage.config import StorageConfig, TierConfig

    sets = sets or ([(args.data, args.format)] if args.data else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    config = EngineConfig.load(data_dir=args.data_dir)
    engine = Engine.from_pretrained(args.model, storage=StorageConfig(tiers=(TierConfig("cpu", 1 << 30),)))
    codecs = gate_codecs(args.gate_codecs, Path(config.data_dir) / "calibration", engine.model.fingerprint)
    defaults = tier_default_codecs()
    for codec in set(defaults.values()) - {"identity"}:
        codecs.setdefault(codec, codec)
    strategy = args.gate_strategy or engine.config.blend.strategy
    ratio = engine.config.blend.recompute_ratio if args.gate_ratio is None else args.gate_ratio
    print(f"answer gate: {strategy}@{ratio:g}, {args.gate_tokens} greedy tokens; tier defaults {defaults}")
    report, failed = {"strategy": strategy, "ratio": ratio, "tier_defaults": defaults, "sets": {}}, set()
    for path, fmt in sets or [(None, None)]:
        samples = load_samples(path, fmt, args.eval_limit, args.eval_max_chunks) if path else demo_samples()
        prompts = [
            GatePrompt(s.id, s.question, tuple(tuple(c) for c in engine.tokenize_chunks(s.chunks)))
            for s in samples[: args.eval_limit]
        ]
        verdicts = run_gate(engine, prompts, codecs, strategy, ratio, args.gate_tokens, print if args.verbose else None)
        name = Path(path).name if path else "demo"
        print(gate_table(verdicts, f"\n{name} (n={len(prompts)})"), flush=True)
        report["sets"][name] = [v.row() for v in verdicts]
        failed |= {tier for tier, c in defaults.items() for v in verdicts if v.codec == c and not v.passes}
    for tier, codec in defaults.items():
        state = "FAILS" if tier in failed else "passes"
        print(f"tier {tier}: default codec {codec} {state} the answer gate")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gate",
        action="store_true",
        help="instead of calibrating: the answer gate on --eval-data (or --data, or the demo): same greedy "
        "answers as uncompressed and kl within 1.1x, per codec; exit 1 if a tier's default codec fails",
    )
    p.add_argument("--gate-codecs", default=GATE_CODECS, help=f"codecs the gate measures (default {GATE_CODECS})")
    p.add_argument("--gate-tokens", type=int, default=24, help="greedy answer tokens compared (default 24)")
    p.add_argument("--gate-strategy", default=None, help="strategy answering (default: the configured one)")
    p.add_argument("--gate-ratio", type=float, default=None, help="its recompute ratio (default: configured)")
    p.add_argument("--verbose", action="store_true", help="print each prompt's outcome per codec")
