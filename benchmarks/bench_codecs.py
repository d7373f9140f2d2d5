"""`ragkv bench codecs`: every codec on real chunk KV (size, speed, error, and blend fidelity).

Chunk KV comes from the model over the chunks of the first N dataset records, stored as fp16 (what a
tier holds). Speeds are fp16-equivalent bytes per second; CPU-bound codecs (cachegen) are decoded
both inline on one core and through a DecodePool, as a store with `decode_workers` does. Fidelity
runs `cacheblend@RATIO` with the chunk KV read through a tier of each codec and compares it with a
full prefill of the same prompt (kl_mean and top-1 teacher-forced over 16 answer tokens, as
`ragkv eval`). `--device cuda` adds decoding on the GPU from the encoded bytes (`Codec.device_layer`:
the Triton kernel for packed, torch dequantization for int8/fp8, the host decoder for the others).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import Codec, DecodePool, EncodedKV, codec_names, get_codec
from ragkv.eval.datasets import FORMATS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ragkv bench codecs", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="model alias or path (default smollm2)")
    p.add_argument("--data", required=True, help="dataset file (musique JSON)")
    p.add_argument("--format", default="musique", choices=FORMATS, help="dataset format (default musique)")
    p.add_argument("--limit", type=int, default=2, help="records to take chunks from (default 2)")
    p.add_argument("--codecs", default=",".join(codec_names()), help="comma-separated codec names (default all)")
    p.add_argument("--ratio", type=float, default=0.15, help="cacheblend recompute ratio for fidelity")
    p.add_argument("--no-fidelity", action="store_true", help="skip the cacheblend fidelity columns")
    p.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="decode processes for CPU-bound codecs, as a store would start (default: one per core)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="also decode every layer on this device from its encoded bytes (e.g. cuda): device_decode_gb_s "
        "columns (default cpu: host decoding only, as before)",
    )
    p.add_argument("--out", default="codecs.json", help="JSON results file")
    return p.parse_args(argv)


def codec_stats(
    codec: Codec, kvs: Sequence[ChunkKV], pool: DecodePool | None = None, repeat: int = 3
) -> dict[str, float]:
    """bits_per_value, ratio_vs_fp16, encode/decode MB/s (fp16-equivalent) and rel_error over `kvs`.

    `decode_1core_mb_s` decodes inline, one entry after another; `decode_mb_s` is what a store with
    `pool` gets: the same entries through the pool's worker processes when the codec is CPU-bound
    (checked bit-identical to inline), else the inline figure. Decode speeds are the median of
    `repeat` passes, the two kinds interleaved (this machine's speed drifts)."""
    values = sum(kv.kv.numel() for kv in kvs)
    codec.decode(codec.encode(kvs[0]))  # warm: first-touch allocations and lazy tables are not the codec's speed
    t0 = time.perf_counter()
    encoded = [codec.encode(kv) for kv in kvs]
    encode_s = time.perf_counter() - t0
    pooled = pool is not None and codec.parallel_decode and pool.alive
    inline_s, pool_s = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        decoded = [codec.decode(e) for e in encoded]
        inline_s.append(time.perf_counter() - t)
        if pooled:
            t = time.perf_counter()
            through_pool = pool.decode_many(codec, encoded)
            pool_s.append(time.perf_counter() - t)
            if not all(torch.equal(a.kv, b.kv) for a, b in zip(decoded, through_pool)):
                raise RuntimeError(f"{codec.name}: the decode pool's output differs from inline decoding")
            del through_pool
    one_core = 2 * values / statistics.median(inline_s) / 1e6
    nbytes = sum(e.nbytes + len(json.dumps(e.meta)) for e in encoded)  # payload + catalog metadata
    err = sum(float((d.kv.float() - kv.kv.float()).pow(2).sum()) for d, kv in zip(decoded, kvs))
    norm = sum(float(kv.kv.float().pow(2).sum()) for kv in kvs)
    return {
        "bits_per_value": 8 * nbytes / values,
        "ratio_vs_fp16": 2 * values / nbytes,
        "encode_mb_s": 2 * values / encode_s / 1e6,
        "decode_mb_s": 2 * values / statistics.median(pool_s) / 1e6 if pooled else one_core,
        "decode_1core_mb_s": one_core,
        "rel_error": (err / norm) ** 0.5,
        "stated_rel_error": getattr(codec, "rel_error", 0.0),
    }


def device_decode_stats(
    codec: Codec,
    kvs: Sequence[ChunkKV],
    device: torch.device | str,
    repeat: int = 5,
    encoded: Sequence[EncodedKV] | None = None,
) -> dict[str, float]:
    """GB/s of fp16 output when every layer is decoded where it is computed (`Codec.device_layer`):
    `device_decode_gb_s` with the encoded sections already on `device`; `device_h2d_decode_gb_s`
    including their copy from pinned host memory (one stream, copy then decode, layer after layer).
    Medians of `repeat` passes; the decoded layers are checked bit-identical to host decoding once.
    `encoded`: `kvs` already encoded by `codec` (else they are encoded here)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tasks, host, resident, parity = [], [], [], True
    for enc, kv in zip(encoded or [codec.encode(kv) for kv in kvs], kvs):
        for layer in range(kv.num_layers):
            task = codec.layer_task(enc, layer, torch.float16)
            section = task.section_tensor(pin=cuda)
            tasks.append(task)
            host.append(section)
            resident.append(section.to(device))
    outs = [torch.empty((2, *t.shape), dtype=torch.float16, device=device) for t in tasks]
    for task, section, out in zip(tasks, resident, outs):  # warm (kernel compile), then check parity
        codec.device_layer(task, section, out)
        parity = parity and torch.equal(out.cpu(), task.run("cpu"))
    sync()
    resident_s, h2d_s = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        for task, section, out in zip(tasks, resident, outs):
            codec.device_layer(task, section, out)
        sync()
        resident_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for task, section, out in zip(tasks, host, outs):
            codec.device_layer(task, section.to(device, non_blocking=True), out)
        sync()
        h2d_s.append(time.perf_counter() - t)
    out_bytes = sum(o.numel() * 2 for o in outs)
    return {
        "device_decode_gb_s": out_bytes / statistics.median(resident_s) / 1e9,
        "device_h2d_decode_gb_s": out_bytes / statistics.median(h2d_s) / 1e9,
        "device_parity": float(parity),
    }


def blend_fidelity(
    engine,
    samples: Sequence,
    kvs: Sequence[Sequence[ChunkKV]],
    codec: str,
    ratio: float,
    references: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """kl_mean / top1_agreement of cacheblend@ratio with every chunk's KV stored through `codec`, against
    the full prefill of the same prompt (teacher-forced on its greedy answer, as `ragkv eval` does)."""
    from ragkv.eval.metrics import kl_per_position, top1_agreement
    from ragkv.storage import MemoryTier, TieredStore

    engine.store = TieredStore([MemoryTier(16 << 30, codec=codec)])
    kls, agree = [], []
    for sample, sample_kvs, (forced, ref_logits) in zip(samples, kvs, references):
        chunks = engine.tokenize_chunks(sample.chunks)
        for ids, kv in zip(chunks, sample_kvs):
            engine.store.put(engine.supply.key(ids, engine.config.namespace), kv)
        run = engine.run(sample.question, chunks=chunks, strategy="cacheblend", recompute_ratio=ratio, reserve=16)
        logits = engine.teacher_forced_logits(run.blend, forced)  # [P, vocab]
        kls.append(float(kl_per_position(ref_logits, logits).mean()))
        agree.append(top1_agreement(ref_logits, logits))
    return {"kl_mean": sum(kls) / len(kls), "top1_agreement": sum(agree) / len(agree)}


def _references(engine, samples: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: the full prefill's greedy answer (16 tokens) and its logits along that answer."""
    refs = []
    for sample in samples:
        full = engine.run(sample.question, chunks=engine.tokenize_chunks(sample.chunks), strategy="full", reserve=16)
        forced = torch.tensor(list(engine.answer_ids(full.blend, 16)) or [int(full.logits.argmax())])
        refs.append((forced, engine.teacher_forced_logits(full.blend, forced)))
    return refs


def run(args: argparse.Namespace) -> int:
    from ragkv.engine.engine import Engine
    from ragkv.eval.datasets import load_samples
    from ragkv.storage.build import default_decode_workers
    from ragkv.storage.config import StorageConfig, TierConfig

    names = [n.strip() for n in args.codecs.split(",") if n.strip()]
    codecs = {n: get_codec(n) for n in names}  # unknown names fail here, before any model work
    samples = load_samples(args.data, args.format, args.limit)
    if not samples:
        raise ValueError(f"no usable samples in {args.data} (format {args.format})")
    engine = Engine.from_pretrained(args.model, storage=StorageConfig(tiers=(TierConfig("cpu", 16 << 30),)))
    torch.set_grad_enabled(False)
    chunk_ids = [engine.tokenize_chunks(s.chunks) for s in samples]
    t0 = time.perf_counter()
    kvs = [
        [kv.to(dtype=torch.float16) for kv in engine.supply.compute(ids, max_tokens_per_pass=2048)] for ids in chunk_ids
    ]
    flat = [kv for sample_kvs in kvs for kv in sample_kvs]
    print(
        f"{len(flat)} chunks, {sum(k.num_tokens for k in flat)} tokens, precomputed in {time.perf_counter() - t0:.1f}s"
    )
    workers = default_decode_workers() if args.decode_workers is None else args.decode_workers
    pool = DecodePool(workers) if workers and any(c.parallel_decode for c in codecs.values()) else None
    if pool is not None and not pool.wait_ready():  # booting workers would steal the cores from the timings
        raise RuntimeError("the decode pool's workers did not start; see the errors above, or pass --decode-workers 0")
    try:
        rows = {n: codec_stats(c, flat, pool) for n, c in codecs.items()}
    finally:
        if pool is not None:
            pool.close()
    if args.device != "cpu":
        for n, c in codecs.items():
            rows[n].update(device_decode_stats(c, flat, args.device))
    if not args.no_fidelity:
        refs = _references(engine, samples)
        base = blend_fidelity(engine, samples, kvs, "identity", args.ratio, refs)
        seen: dict[str, dict[str, float]] = {}
        for n in codecs:
            core = n.removeprefix("lz4+") if n.startswith("lz4+") else ("identity" if n == "lz4" else n)
            if core not in seen:  # lz4 is lossless: lz4+X decodes to exactly X's tensors
                seen[core] = (
                    base if get_codec(core).lossless else blend_fidelity(engine, samples, kvs, core, args.ratio, refs)
                )
            rows[n].update({**seen[core], "kl_vs_uncompressed": seen[core]["kl_mean"] / max(base["kl_mean"], 1e-12)})
    meta = {
        "model": args.model,
        "data": str(args.data),
        "limit": args.limit,
        "chunks": len(flat),
        "tokens": sum(k.num_tokens for k in flat),
        "ratio": args.ratio,
        "torch_threads": torch.get_num_threads(),
        "decode_workers": pool.workers if pool is not None else 0,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "codecs": rows}, indent=2))
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """The results as a markdown table, one row per codec."""
    cols = [
        "bits_per_value",
        "ratio_vs_fp16",
        "encode_mb_s",
        "decode_mb_s",
        "decode_1core_mb_s",
        "device_decode_gb_s",
        "device_h2d_decode_gb_s",
        "device_parity",
        "rel_error",
        "stated_rel_error",
        "kl_mean",
        "kl_vs_uncompressed",
        "top1_agreement",
    ]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    lines = ["| codec | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.4g}" if c in r else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
