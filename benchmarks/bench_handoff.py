"""Hand-off benchmark: ragkv's fused KV handed to an inference server's process on the same GPU, without vLLM.

Two processes on one GPU. The producer (this process) builds a random-init Llama-3.1-8B-shaped model
(gpu_model.build_model, bf16), fuses prompts of 10 chunks (~5K/10K/20K tokens) with cacheblend@0.15
and publishes each fused prompt with `FusedKVStore.publish` along one hand-off path (cuda_ipc, shm,
file). The consumer (a spawned process) runs the connector's real load path
(`FusedPromptMatcher.load_one`: find the record, map or read the KV, write every layer's rows into a
paged cache laid out as vLLM's FlashAttention backend exposes it, [blocks, H_kv, block_size, 2 D],
through a shuffled block table, synchronize, ack) and sends back its time and a sample of the rows it
wrote, which the producer checks against what it fused. Per prompt and path: publish ms, consumer
load ms, hand-off ms (= both), as % of HF forward (`model(ids, logits_to_keep=1)`), and TTFT = blend +
hand-off against HF forward (the consumer's one-token prefill is not included). Medians of --repeats.

    python benchmarks/bench_handoff.py --out gpu-out/bench_handoff.json   # on the GPU machine
    python benchmarks/bench_handoff.py --dry-run                          # CPU, tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from gpu_model import build_model, require_device  # benchmarks/ is on sys.path

from ragkv.adapters.vllm_loader import FusedPromptMatcher, LoadSpec
from ragkv.blend import blend, make_plan, make_strategy
from ragkv.chunk_cache import precompute_many
from ragkv.server.fused_store import FusedKVStore, KVShape, stack_rows

BLOCK = 16  # vLLM's default block size
SAMPLE = 4  # rows checked at each end of the prompt, first and last layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consumer_main(conn, root: str, shm_dir: str, shape: tuple, max_tokens: int, device: str, dtype: str) -> None:
    """The inference server's side: a paged cache per layer, then loads on request until told to stop."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    layers, heads, dim = shape
    num_blocks = (max_tokens + BLOCK - 1) // BLOCK + 1
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(num_blocks, heads, BLOCK, 2 * dim, dtype=dt, device=dev)
        for i in range(layers)
    }
    matcher = FusedPromptMatcher(FusedKVStore(root, shm_dir=shm_dir), KVShape(*shape), BLOCK)
    g = torch.Generator().manual_seed(3)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        ids = msg
        table = torch.randperm(num_blocks, generator=g)[: (len(ids) + BLOCK - 1) // BLOCK].tolist()
        spec = LoadSpec("bench", ids, table, 0, len(ids) - 1)
        _sync(dev)
        t0 = time.perf_counter()
        rows = matcher.load_one(spec, caches)  # synchronizes the device before it returns
        ms = (time.perf_counter() - t0) * 1e3
        failed = matcher.take_failed_blocks()
        sample = {}
        if rows:
            for layer in (0, layers - 1):
                kv = caches[f"model.layers.{layer}.self_attn.attn"]
                for start in (0, len(ids) - 1 - SAMPLE):
                    pos = torch.arange(start, start + SAMPLE)
                    blocks = torch.tensor(table)[pos // BLOCK].to(dev)
                    sample[(layer, start)] = kv[blocks, :, (pos % BLOCK).to(dev)].cpu()
        conn.send({"ms": ms, "rows": rows, "failed": len(failed), "sample": sample})


class Consumer:
    """The consumer process and its pipe."""

    def __init__(self, root: Path, shm_dir: Path, shape: KVShape, max_tokens: int, device: str, dtype: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, str(root), str(shm_dir), (shape.num_layers, shape.num_kv_heads, shape.head_dim))
        self.proc = ctx.Process(target=consumer_main, args=(*args, max_tokens, device, dtype), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the consumer process did not start")

    def load(self, ids: list[int]) -> dict:
        self.conn.send(ids)
        if not self.conn.poll(600):
            raise RuntimeError("the consumer did not answer within 600 s")
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
        self.proc.join(30)


def check_sample(sample: dict, kv: torch.Tensor) -> bool:
    """The consumer's rows equal the fused KV [layers, N-1, H, 2D] the producer published."""
    return bool(sample) and all(
        torch.equal(rows, kv[layer, start : start + SAMPLE].cpu()) for (layer, start), rows in sample.items()
    )


def hand_off(store: FusedKVStore, consumer: Consumer, ids, keys, values, device, path: str) -> dict:
    """Publish along `path`, have the consumer load it, release it; times and checks."""
    store.handoff = path
    _sync(device)
    t0 = time.perf_counter()
    record = store.publish(ids, keys, values)
    _sync(device)
    publish_ms = (time.perf_counter() - t0) * 1e3
    got = consumer.load(ids)
    ok = got["rows"] == len(ids) - 1 and got["failed"] == 0
    if ok:
        ok = check_sample(got["sample"], stack_rows(ids, keys, values, None))
    store.remove(ids)
    return dict(path=record.path, fallback=list(record.fallback), publish_ms=publish_ms, load_ms=got["ms"], ok=ok)


def bench(args, model, device: torch.device, report: dict, save) -> None:
    g = torch.Generator().manual_seed(1)
    vocab, query_tokens = model.config.vocab_size, 32
    root = Path(tempfile.mkdtemp(prefix="bench-handoff-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    shape = KVShape(model.num_layers, model.config.num_key_value_heads, model.config.head_dim)
    tokens = [int(t) for t in args.tokens.split(",")]
    store = FusedKVStore(root, shm_dir=root, budget_bytes=1 << 40)
    consumer = Consumer(root, root, shape, max(tokens) + 1, str(device), args.dtype)
    strategy = make_strategy("cacheblend", 0.15)
    try:
        for total in tokens:
            per_chunk = max(1, (total - query_tokens - 1) // args.chunks)
            chunks = [torch.randint(3, vocab, (per_chunk,), generator=g).tolist() for _ in range(args.chunks)]
            plan = make_plan([1], chunks, torch.randint(3, vocab, (query_tokens,), generator=g).tolist())
            kvs = precompute_many(model, chunks)
            sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, kvs)]
            ids_dev = plan.input_ids[None].to(device)
            hf_ms, blend_ms, result = [], [], None
            for _ in range(args.repeats + 1):  # the first of each is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.model(ids_dev, logits_to_keep=1, use_cache=False)
                _sync(device)
                hf_ms.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                result = blend(model, plan, strategy, sources)
                _sync(device)
                blend_ms.append((time.perf_counter() - t0) * 1e3)
            hf, fused = statistics.median(hf_ms[1:]), statistics.median(blend_ms[1:])
            ids = plan.input_ids.tolist()
            kv = result.prompt_kv()
            keys, values = [k for k, _ in kv], [v for _, v in kv]
            print(f"-- {len(ids)} tokens: HF forward {hf:.1f} ms, blend {fused:.1f} ms", flush=True)
            for path in args.paths.split(","):
                if path == "cuda_ipc" and device.type != "cuda":
                    report["skipped"].append(f"{len(ids)} tokens, cuda_ipc: needs CUDA")
                    continue
                try:
                    runs = [hand_off(store, consumer, ids, keys, values, device, path) for _ in range(args.repeats + 1)]
                except Exception as exc:  # one failing path must not lose the run
                    report["errors"].append(dict(tokens=len(ids), path=path, error=f"{type(exc).__name__}: {exc}"))
                    report["errors"][-1]["trace"] = traceback.format_exc()
                    continue
                row = _row(len(ids), path, runs[1:], hf, fused, result.recompute_fraction)
                report["rows"].append(row)
                print(
                    f"   {path:8s} took {row['path_taken']:8s} publish {row['publish_ms']:8.2f} ms  load "
                    f"{row['load_ms']:8.2f} ms  hand-off {row['handoff_ms']:8.2f} ms = {row['handoff_pct_hf']:6.2f}% "
                    f"of HF  TTFT {row['ttft_ms']:8.1f} ms = {row['x_hf']:5.2f}x HF  ok {row['ok']}",
                    flush=True,
                )
                save()
            del kvs, sources, result, kv, keys, values
    finally:
        consumer.close()
        store.ledger.release_all()
        shutil.rmtree(root, ignore_errors=True)


def _row(n: int, path: str, runs: list[dict], hf: float, fused: float, recompute: float) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("publish_ms", "load_ms")}
    handoff = statistics.median(r["publish_ms"] + r["load_ms"] for r in runs)
    return dict(
        tokens=n,
        path=path,
        path_taken=runs[0]["path"],
        fallback=runs[0]["fallback"],
        publish_ms=round(med["publish_ms"], 3),
        load_ms=round(med["load_ms"], 3),
        handoff_ms=round(handoff, 3),
        handoff_pct_hf=round(100 * handoff / hf, 2),
        hf_ms=round(hf, 2),
        blend_ms=round(fused, 2),
        ttft_ms=round(fused + handoff, 2),
        x_hf=round(hf / (fused + handoff), 2),
        recompute_fraction=round(recompute, 3),
        ok=all(r["ok"] for r in runs),
    )


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, tiny prompts, one repeat")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", default="5000,10000,20000", help="prompt sizes (10 chunks + a 32-token query)")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--paths", default="cuda_ipc,shm,file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="gpu-out/bench_handoff.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.device, args.dtype, args.repeats = "tiny", "cpu", "float32", 1
        args.tokens = "64,128" if args.tokens == p.get_default("tokens") else args.tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    t0 = time.perf_counter()
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.shape} {args.dtype} on {machine}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="bench_handoff", machine=machine, args=vars(args), rows=[], skipped=[], errors=[])

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(report, indent=1))

    bench(args, model, device, report, save)
    save()
    print(f"wrote {out} ({len(report['rows'])} rows, {len(report['errors'])} errors)", flush=True)
    for e in report["errors"]:
        print(f"   FAILED {e['tokens']} {e['path']}: {e['error']}", flush=True)
    return 1 if report["errors"] or not all(r["ok"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
