"""Storage benchmark: load + decode N chunks of chunk KV from the disk tier, per codec, in ms.

`python benchmarks/bench_storage.py --codecs identity,lz4` (SmolLM2-135M's KV shape by default: 30 layers,
3 kv heads, head_dim 64, fp16; 10 chunks of 550 tokens). Reads go through `TieredStore.get_layered`
and `.layer(l)` in the blend loop's order (layer-major). `cold` drops the files from the page cache
(posix_fadvise DONTNEED) before each read; `warm` reads them from the page cache. Keys are read
with `get_layered_many` (parallel threads); "one thread" reads them one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKey, ChunkKV
from ragkv.storage.disk import DiskTier
from ragkv.storage.tiered import TieredStore


def synthetic_chunks(n: int, tokens: int, layers: int, heads: int, head_dim: int, seed: int = 0) -> list[ChunkKV]:
    """Random fp16 KV with per-channel scales (keys) like real caches; lz4's worst case (high entropy)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(2, layers, 1, heads, head_dim, generator=g) * 4 + 0.1  # [2, L, 1, H, D]
    return [
        ChunkKV(
            (torch.randn(2, layers, tokens, heads, head_dim, generator=g) * scale).half(), pos0=1
        )  # [2, L, T, H, D]
        for _ in range(n)
    ]


def _drop_page_cache(tier: DiskTier) -> None:
    for path in (tier.root / "data").rglob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(store: TieredStore, keys: list[ChunkKey], layers: int, parallel: bool = True) -> float:
    """ms to fetch every key and decode every layer, layer-major like the blend loop."""
    t0 = time.perf_counter()
    sources = store.get_layered_many(keys, "cpu") if parallel else [store.get_layered(k, "cpu") for k in keys]
    assert all(s is not None for s in sources), "every benchmark key must hit"
    for layer in range(layers):
        for s in sources:
            s.layer(layer)
    return (time.perf_counter() - t0) * 1e3


def bench_codec(codec: str, chunks: list[ChunkKV], root: Path, repeat: int) -> dict:
    """Write `chunks` to a fresh disk tier with `codec`, then time cold and warm loads."""
    tier = DiskTier(root / codec.replace("+", "_"), 1 << 40, codec)
    store = TieredStore([tier], promote=False)
    keys = [ChunkKey.of("bench", "bench", [i]) for i in range(len(chunks))]
    t0 = time.perf_counter()
    for k, c in zip(keys, chunks):
        store.put(k, c)
    write_ms = (time.perf_counter() - t0) * 1e3
    layers = chunks[0].num_layers
    cold, warm, serial = [], [], []
    for _ in range(repeat):
        _drop_page_cache(tier)
        cold.append(_read_all(store, keys, layers))
        warm.append(_read_all(store, keys, layers))
        serial.append(_read_all(store, keys, layers, parallel=False))
    fp16_bytes = sum(c.num_layers * c.num_tokens * c.num_kv_heads * c.head_dim * 2 * 2 for c in chunks)
    store.close()
    return {
        "codec": codec,
        "chunks": len(chunks),
        "tokens": sum(c.num_tokens for c in chunks),
        "fp16_mb": round(fp16_bytes / 1e6, 1),
        "disk_mb": round(tier.nbytes / 1e6, 1),
        "write_ms": round(write_ms, 1),
        "load_cold_ms": round(statistics.median(cold), 1),
        "load_warm_ms": round(statistics.median(warm), 1),
        "load_warm_serial_ms": round(statistics.median(serial), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_storage.py", description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default="identity", help="comma-separated codec names (default: identity)")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=550)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefill-s", type=float, default=20.0, help="full-prefill time to compare with (s)")
    ap.add_argument("--dir", default=None, help="where to put the disk tier (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    chunks = synthetic_chunks(args.chunks, args.tokens, args.layers, args.kv_heads, args.head_dim)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [bench_codec(c.strip(), chunks, Path(tmp), args.repeat) for c in args.codecs.split(",")]
    for r in rows:
        r["cold_vs_prefill"] = round(r["load_cold_ms"] / (args.prefill_s * 1e3), 4)
    print(
        "| codec | chunks x tokens | fp16 MB | disk MB | write ms | load+decode cold ms | warm ms "
        "| warm, one thread ms | cold / prefill |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['codec']} | {r['chunks']} x {r['tokens'] // r['chunks']} | {r['fp16_mb']} | {r['disk_mb']} | "
            f"{r['write_ms']} | {r['load_cold_ms']} | {r['load_warm_ms']} | {r['load_warm_serial_ms']} "
            f"| {100 * r['cold_vs_prefill']:.1f}% |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
