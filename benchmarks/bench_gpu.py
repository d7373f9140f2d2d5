"""GPU fusion benchmark: TTFT of the blend vs HF forward on a random-init model of a real shape.

`python benchmarks/bench_gpu.py` (or `ragkv bench gpu`): a Llama-3.1-8B-shaped model built from a
LlamaConfig (no weights: random init, bf16 on CUDA), prompts of 10, 20 and 40 chunks x 512 random
tokens + a 32-token query. Baselines: HF forward (`model(ids, logits_to_keep=1)`) and `full`; then
`naive`, `cacheblend@0.15`, `epic@0.15` with chunk KV resident on the GPU, and (cacheblend by
default) pinned in CPU memory and on the disk tier (lz4 and cachegen decoded on the host, int8 and packed
crossing as encoded bytes and decoded on the GPU; warm page cache; prompts of up to `--disk-max-chunks`).
First, each codec's encode and decode GB/s on the model's chunk KV (`--codecs`). TTFT = store look-up +
blend up to the first token's logits, timed with CUDA events, median of `--repeats` after `--warmup`
runs. Each row also keeps the look-up alone (`get_layered_many`: what runs before layer 0), the blend's
parts (load = what the copies failed to hide, rerotate, recompute, first token; CUDA events), the time to load
every layer of the cached rows alone (no compute), the peak GPU memory above the weights, and the compute
limit: 1 / (fraction of the token-layer work the strategy computes). Then prepacked vs one-by-one
precompute. Writes JSON (after every row) and prints a table. `--dry-run`: a tiny model on CPU,
tiny prompts, one repeat, the same code paths (pinned memory becomes plain host memory without CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_model import SHAPES, build_model, require_device
from gpu_precompute import bench_precompute
from gpu_sources import bench_codecs, make_stores, parse_source  # benchmarks/ is on sys.path
from gpu_timing import HEADER, Timer, median_ms, peak_gb, print_row, rounded

from ragkv.blend import LayerLoader, blend, make_plan, make_strategy
from ragkv.blend.config import parse_strategy
from ragkv.chunk_cache import precompute_many
from ragkv.models import attention as attention_kernels

DRY_RUN = dict(
    shape="tiny",
    device="cpu",
    dtype="float32",
    chunks="2,3",
    chunk_tokens=16,
    query_tokens=4,
    repeats=1,
    warmup=0,
    precompute_tokens="8,16",
    precompute_chunks=4,
)


def compute_limit(plan, result, num_layers: int) -> float:
    """1 / (fraction of the token-layer work computed): fresh rows every layer + recomputed chunk rows."""
    cached = sum(end - start for start, end in plan.chunk_spans)
    fresh = plan.num_tokens - cached
    work = fresh + result.recompute_fraction * cached
    return round(plan.num_tokens / work, 2)


def bench_prompts(args, model, device: torch.device, rows: list, errors: list, save: Callable[[], None]) -> None:
    timer = Timer(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    strategies = args.strategies.split(",")
    sources = [parse_source(spec) for spec in args.sources.split(",")]
    source_strategies = set(args.source_strategies.split(","))
    attentions = args.attention.split(",")
    scratch = tempfile.TemporaryDirectory(prefix="bench-gpu-")  # the disk stores; removed when the process exits
    root = Path(scratch.name)
    print(HEADER, flush=True)
    for num_chunks in map(int, args.chunks.split(",")):
        chunks = [torch.randint(3, vocab, (args.chunk_tokens,), generator=g).tolist() for _ in range(num_chunks)]
        query = torch.randint(3, vocab, (args.query_tokens,), generator=g).tolist()
        plan = make_plan([1], chunks, query)
        kvs = precompute_many(model, chunks, max_tokens_per_pass=args.pass_tokens)
        ids = plan.input_ids[None].to(device)
        print(f"-- {num_chunks} chunks: {plan.num_tokens} prompt tokens", flush=True)
        base = {"chunks": num_chunks, "tokens": plan.num_tokens}
        hf_ms = None

        def record(row: dict) -> None:
            row = {**base, **row}
            if hf_ms and row.get("ttft_ms"):
                row["x_hf"] = round(hf_ms / row["ttft_ms"], 2)
            rows.append(row)
            print_row(row)
            save()  # a run cut short by a time limit keeps every finished row

        stores = {}
        try:
            if "hf" in strategies:

                def hf():
                    with torch.inference_mode():
                        model.model(ids, logits_to_keep=1, use_cache=False)

                hf_ms, times = median_ms(timer, hf, args.repeats, args.warmup)
                record(
                    dict(
                        strategy="hf-forward",
                        source="-",
                        attention="sdpa",
                        ttft_ms=round(hf_ms, 2),
                        times_ms=rounded(times),
                        peak_gb=peak_gb(device, hf),
                        limit_x=1.0,
                    )
                )
            for label in strategies:
                if label == "hf":
                    continue
                name, ratio = parse_strategy(label)
                strategy = make_strategy(name, ratio or 0.0)
                for source, max_chunks in sources if strategy.reuse != "none" else [("-", None)]:
                    if source != "-" and source != "gpu" and label not in source_strategies:
                        continue
                    if source.startswith("disk-") and num_chunks > (max_chunks or args.disk_max_chunks):
                        continue  # host decoding of the biggest prompts would eat the run's time budget
                    if source not in ("gpu", "-"):
                        kinds = [args.source_attention]
                    elif name.partition("+")[0] in ("cacheblend", "epic"):  # cacheblend+query too
                        kinds = attentions
                    else:
                        kinds = ["auto"]
                    for attention in kinds:
                        try:
                            record(
                                _blend_row(
                                    args, model, device, timer, plan, kvs, strategy, source, attention, stores, root
                                )
                            )
                        except Exception as exc:  # one failing row must not lose the run
                            errors.append(
                                dict(
                                    base,
                                    strategy=label,
                                    source=source,
                                    attention=attention,
                                    error=f"{type(exc).__name__}: {exc}",
                                    trace=traceback.format_exc(),
                                )
                            )
                            print(f"   FAILED {label} {source} {attention}: {type(exc).__name__}: {exc}", flush=True)
        finally:
            for store, _ in stores.values():
                store.close()
        del kvs


def _blend_row(args, model, device, timer, plan, kvs, strategy, source, attention, stores, root) -> dict:
    if source == "-":
        get_sources = lambda: ()  # noqa: E731
        load_ms = lookup_ms = None
    else:
        if source not in stores:
            stores[source] = make_stores(source, kvs, device, root)
        store, keys = stores[source]
        spans = [start for start, _ in plan.chunk_spans]
        get_sources = lambda: list(zip(spans, store.get_layered_many(keys, device)))  # noqa: E731

        def load_only():
            for _ in LayerLoader([kv for _, kv in get_sources()], model.num_layers, device, model.dtype):
                pass

        load_ms, _ = median_ms(timer, load_only, max(1, args.repeats // 2), min(1, args.warmup))
        lookup_ms, _ = median_ms(timer, get_sources, max(1, args.repeats // 2), min(1, args.warmup))
    out = {}

    def run():
        out["result"] = blend(model, plan, strategy, get_sources(), attention=attention)

    ttft, times = median_ms(timer, run, args.repeats, args.warmup)
    peak = peak_gb(device, run)
    result = out.pop("result")
    parts = {k: round(v * 1e3, 2) for k, v in result.seconds.items()}  # device time on CUDA (events); total: host
    return dict(
        strategy=strategy.label,
        source=source,
        attention=attention,
        ttft_ms=round(ttft, 2),
        times_ms=rounded(times),
        load_only_ms=None if load_ms is None else round(load_ms, 2),
        lookup_ms=None if lookup_ms is None else round(lookup_ms, 2),  # get_layered_many alone: before layer 0
        parts_ms=parts,
        load_waited_ms=parts.get("load") if source != "-" else None,
        peak_gb=peak,
        recompute_fraction=round(result.recompute_fraction, 4),
        limit_x=compute_limit(plan, result, model.num_layers),
    )


def dry_run_defaults(parser: argparse.ArgumentParser, args, values: dict) -> dict:
    """Set each of `values` on `args` where its flag was left at its default (explicit flags still win);
    returns the parser's defaults."""
    defaults = {a.dest: a.default for a in parser._actions}
    for key, value in values.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    return defaults


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model's flags (what `build_model` takes): --shape, --layers, --device, --dtype."""
    p.add_argument("--shape", default="llama-3.1-8b", help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the shape's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="ragkv bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, tiny prompts, one repeat")
    add_model_args(p)
    p.add_argument("--chunks", default="10,20,40", help="chunks per prompt, comma-separated")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--pass-tokens", type=int, default=16384, help="prepacking budget of the chunk precompute")
    p.add_argument(
        "--strategies",
        default="hf,full,naive,cacheblend@0.15,cacheblend+query@0.15,epic@0.15",
        help="comma-separated: hf, or any strategy name make_strategy accepts, with @RATIO (cachecraft+query@0.15)",
    )
    p.add_argument(
        "--sources",
        default="gpu,pinned,disk-lz4,disk-int8,disk-packed,disk-packed/whole,disk-cachegen:10",
        help="gpu, pinned, disk-CODEC (read per layer), disk-CODEC/whole (read whole at the look-up); "
        "':N' limits a source to prompts of at most N chunks",
    )
    p.add_argument("--codecs", default="int8,fp8,packed,cachegen", help="codecs of the decode-speed rows ('' skips)")
    p.add_argument("--codec-chunks", type=int, default=10, help="chunks of the decode-speed rows")
    p.add_argument("--source-strategies", default="cacheblend@0.15", help="strategies also run from non-GPU sources")
    p.add_argument("--attention", default="flex,dense", help="mask kinds for cacheblend/epic rows (auto, blocks, ...)")
    p.add_argument("--disk-max-chunks", type=int, default=20, help="disk sources only for prompts up to this size")
    p.add_argument("--source-attention", default="dense", help="mask kind of the rows read from non-GPU sources")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--precompute-tokens", default="128,256,512", help="chunk lengths of the precompute comparison ('' skips)"
    )
    p.add_argument("--precompute-chunks", type=int, default=64)
    p.add_argument("--out", default="gpu-out/bench_gpu.json")
    args = p.parse_args(argv)
    if args.dry_run:
        defaults = dry_run_defaults(p, args, DRY_RUN)
        if args.attention == defaults["attention"]:
            args.attention = "blocks,dense,flex"
    for label in args.strategies.split(",") + args.source_strategies.split(","):
        if label != "hf":  # an unknown strategy fails here, naming the known ones, before any model work
            parse_strategy(label)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if device.type != "cuda":  # FlexAttention's eager reference is what the CPU runs, on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build_model(args.shape, args.device, dtype, args.layers or None)
    print(
        f"{args.shape} ({model.num_layers} layers) {args.dtype} on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
        f"built in {time.perf_counter() - t0:.1f} s; TTFT median of {args.repeats} after {args.warmup} warm-up",
        flush=True,
    )
    rows: list[dict] = []
    precompute_rows: list[dict] = []
    codec_table: list[dict] = []
    errors: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        benchmark="bench_gpu",
        date=datetime.date.today().isoformat(),
        command="ragkv bench gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        torch=torch.__version__,
        args=vars(args),
        rows=rows,
        codecs=codec_table,
        precompute=precompute_rows,
        errors=errors,
        seconds=None,
    )

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["flex_failure"] = attention_kernels.FLEX_FAILURE
        report["varlen_failure"] = attention_kernels.VARLEN_FAILURE
        report["flex_shapes"] = sorted(attention_kernels.FLEX_SHAPES)  # (query, key) buckets compiled
        out.write_text(json.dumps(report, indent=1))

    if args.codecs:
        try:
            bench_codecs(args, model, device, codec_table)
        except Exception as exc:
            errors.append(dict(part="codecs", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()))
        save()
    bench_prompts(args, model, device, rows, errors, save)
    try:
        if args.precompute_tokens:
            bench_precompute(args, model, device, precompute_rows)
    except Exception as exc:
        errors.append(dict(part="precompute", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()))
    save()
    print(f"wrote {out} ({len(rows)} rows, {len(errors)} errors) in {report['seconds']} s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
