"""packed encode speed: the fused encoder (compression/packed_encode.py) against the reference layer-by-layer
encoder, same bytes checked, on KV-like data of a model's shape, on the CPU or the GPU.

    python benchmarks/gpu_encode.py --device cpu --shape smollm2       # CPU comparison (docs/BENCHMARKS.md)
    python benchmarks/gpu_encode.py --device cuda --shape llama-3.1-8b # the device figure (scripts/gpu_check.sh)

GB/s are of fp16 KV in (2 bytes a value), the median of `--repeats` after one warm-up; on CUDA the time
includes the bytes' copy to the host (what a store's `put` needs). Writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ragkv.chunk_cache import ChunkKV
from ragkv.compression.packed import PackedCodec, PackedConfig

SHAPES = {  # layers, kv heads, head dim
    "smollm2": (30, 3, 64),
    "llama-3.1-8b": (32, 8, 128),
    "tiny": (4, 2, 16),
}


def kv_like(layers: int, tokens: int, heads: int, dim: int, device: str, seed: int = 0) -> ChunkKV:
    """fp16 [2, L, T, H, D] with per-channel scales and offsets and a few loud key channels (as real keys)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, layers, tokens, heads, dim, generator=g)
    scale = torch.rand(2, layers, 1, heads, dim, generator=g) * 2 + 0.1
    scale[0, :, :, :, :4] *= 8  # outlier key channels
    offset = torch.randn(2, layers, 1, heads, dim, generator=g)
    return ChunkKV((x * scale + offset).half().to(device), 1)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()  # warm-up (and the result checked for parity)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(args) -> dict:
    device = torch.device(args.device)
    layers, heads, dim = SHAPES[args.shape]
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        kv = kv_like(args.layers or layers, tokens, heads, dim, args.device)
        nbytes = kv.kv.numel() * 2
        row = dict(tokens=tokens, layers=kv.num_layers, heads=heads, head_dim=dim, fp16_mb=round(nbytes / 1e6, 2))
        fused_s, fused = timed(lambda: PackedCodec(PackedConfig()).encode(kv), device, args.repeats)
        row["fused_gb_s"] = round(nbytes / fused_s / 1e9, 4)
        if not args.skip_reference:
            ref_s, ref = timed(lambda: PackedCodec(PackedConfig(), fused=False).encode(kv), device, args.repeats)
            row["reference_gb_s"] = round(nbytes / ref_s / 1e9, 4)
            row["x_reference"] = round(ref_s / fused_s, 2)
            row["same_bytes"] = fused.payload == ref.payload and fused.meta == ref.meta
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(
        benchmark="gpu_encode",
        date=datetime.date.today().isoformat(),
        command="python benchmarks/gpu_encode.py " + " ".join(sys.argv[1:]),
        machine=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        load_average=list(os.getloadavg()),
        torch_threads=torch.get_num_threads(),
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_encode", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: the shape's)")
    p.add_argument("--tokens", default="512", help="chunk lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true", help="time the fused encoder only")
    p.add_argument("--out", default="gpu-out/gpu_encode.json")
    args = p.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0 if all(r.get("same_bytes", True) for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
