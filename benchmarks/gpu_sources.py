"""Where `bench_gpu` keeps chunk KV between runs, and how fast each codec decodes on the device.

Sources are named `gpu`, `pinned` or `disk-CODEC`, with an optional `:N` (only for prompts of at most N
chunks: a host-decoded codec on the largest prompts would eat the run's time). A disk tier reads each layer
when the loader asks (`FileLayers`); `disk-CODEC/whole` reads and verifies whole entries at the look-up
instead (`DiskTier(layer_reads=False)`, the former behaviour, for comparison). A disk source whose codec
decodes on the CPU (cachegen) gets a DecodePool of one worker per core, as a store with `decode_workers` does;
codecs that decode on the device (int8, fp8, packed) cross as encoded bytes (`LayerLoader`'s device path).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKey, precompute_many
from ragkv.compression import DecodePool, get_codec


def parse_source(spec: str) -> tuple[str, int | None]:
    """ "disk-packed:20" -> ("disk-packed", 20); "gpu" -> ("gpu", None)."""
    name, _, limit = spec.partition(":")
    return name, int(limit) if limit else None


def make_stores(kind: str, kvs, device: torch.device, root: Path):
    """(store, keys) holding `kvs` in the tier named `kind`: gpu, pinned, or disk-CODEC."""
    from ragkv.storage import MemoryTier, TieredStore
    from ragkv.storage.disk import DiskTier

    cuda = device.type == "cuda"
    pool = None
    if kind == "gpu":
        tier = MemoryTier(1 << 40, device=device)  # on CPU (dry run) this is plain host memory
    elif kind == "pinned":
        tier = MemoryTier(1 << 40, device="cpu", pin=cuda)
    elif kind.startswith("disk-"):
        codec, _, whole = kind.removeprefix("disk-").partition("/")
        if whole not in ("", "whole"):
            raise ValueError(f"unknown disk source {kind!r}; accepted: disk-CODEC or disk-CODEC/whole")
        pool = DecodePool(os.cpu_count() or 1) if get_codec(codec).parallel_decode else None
        folder = root / kind.removeprefix("disk-").replace("+", "_").replace("/", "_")
        tier = DiskTier(folder, 1 << 42, codec, decode_pool=pool, layer_reads=not whole)
    else:
        raise ValueError(f"unknown source {kind!r}; accepted: gpu, pinned, disk-CODEC (e.g. disk-lz4, disk-lz4/whole)")
    store = TieredStore([tier], promote=False, decode_pool=pool)  # closing the store ends the pool's workers
    keys = [ChunkKey.of("bench-gpu", kind, [i]) for i in range(len(kvs))]
    for key, kv in zip(keys, kvs):
        store.put(key, kv)  # codecs that encode on the device (int8, packed) do it on the GPU
    return store, keys


def codec_rows(codecs: list[str], kvs, device: torch.device, repeat: int, host_chunks: int) -> list[dict]:
    """Per codec: encode and decode speed in GB/s of fp16 KV on `device` (`Codec.device_layer` from bytes
    already there, and with their copy from pinned memory), bits per value and bit-parity with the host
    decoder. Codecs without a device decoder decode on the host, over `host_chunks` chunks only."""
    from bench_codecs import device_decode_stats  # benchmarks/ is on sys.path (script dir or `ragkv bench`)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name in codecs:
        codec = get_codec(name)
        chunks = kvs if codec.device_decode else kvs[:host_chunks]
        fp16 = [kv.to(dtype=torch.float16) for kv in chunks]
        sync()
        start = time.perf_counter()
        encoded = [codec.encode(kv) for kv in fp16]  # from the KV's device to host bytes
        encode_s = time.perf_counter() - start
        values = sum(kv.kv.numel() for kv in fp16)
        stats = device_decode_stats(codec, fp16, device, repeat if codec.device_decode else 1, encoded)
        rows.append(
            dict(
                codec=name,
                chunks=len(fp16),
                device_decode=codec.device_decode,
                bits_per_value=round(8 * sum(e.nbytes for e in encoded) / values, 3),
                encode_gb_s=round(2 * values / encode_s / 1e9, 3),
                **{k: round(v, 3) for k, v in stats.items()},
            )
        )
    return rows


def bench_codecs(args, model, device: torch.device, table: list) -> None:
    """Encode and decode GB/s of each codec on this model's chunk KV (`codec_rows`), printed and added to `table`."""
    g = torch.Generator().manual_seed(3)
    chunks = [
        torch.randint(3, model.config.vocab_size, (args.chunk_tokens,), generator=g).tolist()
        for _ in range(args.codec_chunks)
    ]
    kvs = precompute_many(model, chunks, max_tokens_per_pass=args.pass_tokens)
    print(f"{'codec':<10} {'chunks':>6} {'bits':>6} {'enc GB/s':>9} {'dec GB/s':>9} {'h2d+dec':>8} {'parity':>6}")
    for row in codec_rows(args.codecs.split(","), kvs, device, min(3, args.repeats), host_chunks=1):
        table.append(row)
        print(
            f"{row['codec']:<10} {row['chunks']:>6} {row['bits_per_value']:>6.2f} {row['encode_gb_s']:>9.2f} "
            f"{row['device_decode_gb_s']:>9.2f} {row['device_h2d_decode_gb_s']:>8.2f} {row['device_parity']:>6.0f}",
            flush=True,
        )
