"""Held-out fidelity of the lossy codecs per bits/value (issue 12): calibrate on some prompts, measure on others.

1. Calibration prompts (e.g. MuSiQue) give the `packed` codec's per-band sensitivity (eval/calibration.py,
   as `ragkv calibrate`); each `--budgets` value becomes a calibrated schedule.
2. Held-out prompts (e.g. 2WikiMQA, Multi-News; never the calibration ones) answer with cacheblend@0.15
   over their chunk KV (fp16) put through each codec setting, against the full prefill (kl_mean and top-1
   teacher-forced over 16 tokens, as `ragkv eval`).

Reported per setting: bits/value (every payload byte, grids included, over the values), kl_mean over the
prompts / kl_mean of the uncompressed blend on the same prompts (the ratio of means), the median of the
per-prompt ratios, and top-1. Each prompt is truncated to `--max-tokens` (chunks cut to `--chunk-tokens`).
Prompts (chunk KV, full-prefill reference, uncompressed blend) and the sensitivity are cached in `--cache`,
so a rerun with other settings costs only the codecs' blends.

    python experiments/codec_heldout.py --cache /tmp/heldout_cache --out codec_heldout.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKV
from ragkv.compression.cachegen import CacheGenCodec, CacheGenConfig
from ragkv.compression.packed import PackedCodec, PackedConfig
from ragkv.compression.packed_layout import format_for
from ragkv.engine.engine import Engine
from ragkv.eval.calibration import CalibrationPrompt, measure_sensitivity, schedule_for_budget
from ragkv.eval.datasets import load_samples

DATA = "../shared/data"  # beside the repository, as the other studies
CALIBRATION = f"{DATA}/cacheblend/musique_s.json:musique:0:3"
HELD_OUT = (
    f"{DATA}/phonecacheblend/wikimqa_s_clean.json:wikimqa:0:6",
    f"{DATA}/longbench/multi_news.jsonl:multinews:0:4",
)


def packed(key_bits, value_bits, key_group=(0, 1), value_group=(0, 1), format=None):
    """A `packed` variant; format 2 (per-channel widths) where the grids are per channel, unless `format`."""
    groups = (tuple(key_group), tuple(value_group))
    version = format or format_for(*groups)
    return lambda: PackedCodec(PackedConfig(tuple(key_bits), tuple(value_bits), *groups, version))


def unruns(text: str) -> tuple[int, ...]:
    """'2,3,2x16' -> (2, 3, 2, 2, ...): per-layer bits written as runs (the inverse of `runs`)."""
    out = []
    for item in text.split(","):
        value, _, count = item.partition("x")
        out += [float(value) if "." in value else int(value)] * int(count or 1)
    return tuple(out)


ISSUE12_25 = unruns("2,3,2x16,4x6,2x6"), unruns("2,5,3x10,2x18")  # calibrated @2.5 of issue 12 (format 1)


VARIANTS = {
    "cachegen default": CacheGenCodec,
    "cachegen bins x2": lambda: CacheGenCodec(
        CacheGenConfig(key_bins=(12, 12, 14, 18, 18, 8), value_bins=(6, 6, 8, 8, 8, 4))
    ),
    "packed K2 V2": packed((2,), (2,)),
    "packed K3 V2 (defaults)": packed((3,), (2,)),
    "packed K3 V3": packed((3,), (3,)),
    "packed K4 V4": packed((4,), (4,)),
    "packed K2 V3": packed((2,), (3,)),
    "packed K3 V2, V per token (1x192)": packed((3,), (2,), value_group=(1, 192)),
    "packed K3 V2, V per token and head (1x64)": packed((3,), (2,), value_group=(1, 64)),
    "packed K2 V2, V per token and head (1x64)": packed((2,), (2,), value_group=(1, 64)),
    "packed K2 V2, K per 64 tokens, V per token and head (1x64)": packed((2,), (2,), (64, 1), (1, 64)),
    "packed K3 V2, K per 128 tokens": packed((3,), (2,), key_group=(128, 1)),
    "packed K2 V2, K per 128 tokens, V per token (1x192)": packed((2,), (2,), (128, 1), (1, 192)),
    "packed K2 V2 format 1": packed((2,), (2,), format=1),
    "packed K3 V2 format 1": packed((3,), (2,), format=1),
    "issue 12 calibrated @2.5, format 1": packed(*ISSUE12_25, format=1),
    "issue 12 calibrated @2.5, format 2 (same mean bits per layer, per-channel widths)": packed(*ISSUE12_25),
}
DEFAULT_VARIANTS = ("cachegen default", "cachegen bins x2", "packed K2 V2", "packed K3 V2 (defaults)")


def runs(bits) -> str:
    """Per-layer bits written as runs: (1, 3, 2, 2, 2) -> '1,3,2x3'."""
    out, i = [], 0
    while i < len(bits):
        j = i
        while j < len(bits) and bits[j] == bits[i]:
            j += 1
        out.append(f"{bits[i]}x{j - i}" if j - i > 1 else f"{bits[i]}")
        i = j
    return ",".join(out)


def parse_spec(spec: str) -> tuple[str, str, int, int]:
    """PATH:FORMAT:SKIP:LIMIT."""
    path, fmt, skip, limit = spec.rsplit(":", 3)
    return path, fmt, int(skip), int(limit)


def load_prompts(engine, specs, max_tokens: int, chunk_tokens: int, cache: Path) -> list[CalibrationPrompt]:
    """The prompts of `specs`, each truncated and prepared (full prefill), cached on disk (`prompt.file`)."""
    prompts = []
    for spec in specs:
        path, fmt, skip, limit = parse_spec(spec)
        for sample in load_samples(path, fmt, skip + limit)[skip:]:
            key = hashlib.sha256(f"{path}|{sample.id}|{max_tokens}|{chunk_tokens}".encode()).hexdigest()[:16]
            file = cache / f"{Path(path).stem}_{sample.id[:12]}_{key}.pt"
            if file.exists():
                state = torch.load(file, weights_only=False)  # our own cache: a plan and tensors
                prompts.append(CalibrationPrompt.restore(engine, state))
                prompts[-1].file = file
                continue
            t0 = time.perf_counter()
            prompt = CalibrationPrompt.of(engine, sample, max_tokens=max_tokens, chunk_tokens=chunk_tokens)
            torch.save(prompt.state(), file)
            print(f"prepared {file.name}: {prompt.num_tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
            prompt.file = file
            prompts.append(prompt)
    return prompts


def baseline(prompt: CalibrationPrompt, ratio: float) -> tuple[float, float]:
    """The uncompressed blend's (kl_mean, top-1), computed once and kept in the prompt's cache file."""
    if ratio not in prompt.uncompressed:
        prompt.baseline(ratio)
        torch.save(prompt.state(), prompt.file)
    return prompt.uncompressed[ratio]


def measure(prompt: CalibrationPrompt, codec, ratio: float) -> dict[str, float]:
    encoded = [codec.encode(kv) for kv in prompt.kvs]
    hats = [ChunkKV(codec.decode(e).kv, kv.pos0) for e, kv in zip(encoded, prompt.kvs)]
    kl, top1 = prompt.fidelity(hats, ratio)
    values = sum(kv.kv.numel() for kv in prompt.kvs)
    return {"bits": 8 * sum(e.nbytes for e in encoded) / values, "kl_mean": kl, "top1": top1}


def summary(rows: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    base = statistics.fmean(r["uncompressed"]["kl_mean"] for r in rows)
    out = {}
    for name in ["uncompressed", *names]:
        kl = statistics.fmean(r[name]["kl_mean"] for r in rows)
        out[name] = {
            "bits": statistics.fmean(r[name]["bits"] for r in rows),
            "kl_mean": kl,
            "kl_ratio": kl / base,
            "median_prompt_ratio": statistics.median(r[name]["kl_mean"] / r["uncompressed"]["kl_mean"] for r in rows),
            "top1": statistics.fmean(r[name]["top1"] for r in rows),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", action="append", help=f"PATH:FORMAT:SKIP:LIMIT (default {CALIBRATION})")
    ap.add_argument("--held-out", action="append", help=f"PATH:FORMAT:SKIP:LIMIT (default {' and '.join(HELD_OUT)})")
    ap.add_argument("--max-tokens", type=int, default=2400, help="chunk tokens kept per prompt")
    ap.add_argument("--chunk-tokens", type=int, default=600, help="tokens kept per chunk")
    ap.add_argument("--bands", default="0,1,2,6,12,18,24", help="N equal bands, or each band's first layer")
    ap.add_argument("--probe-bits", type=int, default=2)
    ap.add_argument("--min-bits", type=float, default=1)
    ap.add_argument("--budgets", default="2.0,2.5,3.0", help="calibrated: BUDGET or BUDGET/MIN_BITS, ('' none)")
    ap.add_argument("--key-group", default="0x1", help="calibrated schedules' K grid geometry TOKENSxCHANNELS")
    ap.add_argument("--value-group", default="0x1", help="calibrated schedules' V grid geometry TOKENSxCHANNELS")
    ap.add_argument(
        "--format", type=int, default=None, help="calibrated schedules' packed format (default: 2 if per channel)"
    )
    ap.add_argument(
        "--quantum", default="1", help="calibrated bits per band in steps of these (',': one schedule each)"
    )
    ap.add_argument(
        "--sensitivity",
        help="a JSON with the measured sensitivity (e.g. docs/bench/codec_heldout.json): no calibration blends",
    )
    ap.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="';'-separated VARIANTS ('' for none)")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ragkv_codec_heldout"))
    ap.add_argument("--previous", help="JSONL of rows printed by an earlier run, counted in the summary too")
    ap.add_argument("--out", default="codec_heldout.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    bands = [int(b) for b in args.bands.split(",")] if "," in args.bands else int(args.bands)
    engine = Engine.from_pretrained("smollm2")
    calibration_specs, held_out_specs = args.calibration or [CALIBRATION], args.held_out or list(HELD_OUT)
    held_out = load_prompts(engine, held_out_specs, args.max_tokens, args.chunk_tokens, cache)
    codecs = {name: VARIANTS[name] for name in args.variants.split(";") if name}
    measured = None
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if budgets:
        calibration = []  # with --sensitivity, the prompts it names were measured before
        if not args.sensitivity:
            calibration = load_prompts(engine, calibration_specs, args.max_tokens, args.chunk_tokens, cache)
        overlap = {p.file.name for p in calibration} & {p.file.name for p in held_out}  # dataset, record, cut
        if overlap:
            raise SystemExit(f"held-out prompts {sorted(overlap)} are also calibration prompts")
        groups = [tuple(int(x) for x in g.split("x")) for g in (args.key_group, args.value_group)]
        key = f"{calibration_specs}|{args.max_tokens}|{args.chunk_tokens}|{args.bands}|{args.probe_bits}|{args.ratio}"
        key += f"|{groups}"
        file = cache / f"sensitivity_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if args.sensitivity:
            measured = json.loads(Path(args.sensitivity).read_text())
            measured = measured.get("sensitivity", measured)
        elif file.exists():
            measured = json.loads(file.read_text())
        else:
            for prompt in calibration:
                baseline(prompt, args.ratio)
            sensitivity = measure_sensitivity(
                calibration, bands, args.probe_bits, args.ratio, print, groups[0], groups[1]
            )
            measured = {"sensitivity_excess_kl": sensitivity, "probe_bits": args.probe_bits, "ratio": args.ratio}
            measured |= {"bands": bands, "num_layers": engine.model.num_layers}
            measured["prompts"] = [p.sample_id for p in calibration]
            file.write_text(json.dumps(measured))
        print("sensitivity (excess kl_mean at probe bits):", json.dumps(measured["sensitivity_excess_kl"]))
        version = args.format or format_for(*groups)
        grid_bits = statistics.fmean(p.grid_bits(*groups, version) for p in held_out)  # the chunk shapes' overhead
        for spec in budgets:  # BUDGET or BUDGET/MIN_BITS
            budget, _, min_bits = spec.partition("/")
            budget, min_bits = float(budget), float(min_bits or args.min_bits)
            for quantum in (float(q) for q in args.quantum.split(",")):
                settings = {"grid_bits": grid_bits, "min_bits": min_bits, "quantum": quantum}
                schedule = schedule_for_budget("-", {**measured, **settings}, budget)
                floor = f" (min {min_bits:g} bits)" if min_bits != args.min_bits else ""
                bits = f"K({runs(schedule.key_bits)}) V({runs(schedule.value_bits)})"
                name = f"packed calibrated @{budget:g}{floor} format {version}, steps of {quantum:g} bit {bits}"
                codecs[name] = packed(schedule.key_bits, schedule.value_bits, *groups, version)
    rows = [json.loads(line) for line in Path(args.previous).read_text().splitlines()] if args.previous else []
    done = {(r["id"], r["tokens"]) for r in rows}
    for prompt in held_out:
        if (prompt.sample_id, prompt.num_tokens) in done:
            continue
        row = {"id": prompt.sample_id, "tokens": prompt.num_tokens}
        kl, top1 = baseline(prompt, args.ratio)
        row["uncompressed"] = {"bits": 16.0, "kl_mean": kl, "top1": top1}
        for name, make in codecs.items():
            row[name] = measure(prompt, make(), args.ratio)
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = summary(rows, [name for name in codecs if all(name in r for r in rows)])
    print(f"\n{len(rows)} held-out prompts, cacheblend@{args.ratio}")
    print("| setting | bits/value | kl_mean | kl / uncompressed | median prompt ratio | top1 |")
    print("|---|---|---|---|---|---|")
    for name, m in table.items():
        print(
            f"| {name} | {m['bits']:.3f} | {m['kl_mean']:.4f} | {m['kl_ratio']:.2f}x | "
            f"{m['median_prompt_ratio']:.2f}x | {m['top1']:.3f} |"
        )
    meta = {"calibration": calibration_specs, "held_out": held_out_specs, "max_tokens": args.max_tokens}
    Path(args.out).write_text(json.dumps({**meta, "sensitivity": measured, "mean": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
