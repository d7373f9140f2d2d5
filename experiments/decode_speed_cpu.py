"""CPU decode speed of cachegen, packed and int8 side by side on one synthetic KV-shaped chunk.

For a machine too loaded to run `ragkv bench codecs` (which precomputes real chunk KV first): one
chunk [2, 4, 512, 3, 64] fp16 (SmolLM2's heads, key channels spread over 100x), one torch thread,
the codecs' decodes interleaved over `--repeat` passes (the load drifts), medians reported as
fp16-equivalent MB/s. Only the ratios between rows mean anything on a shared machine.

    python experiments/decode_speed_cpu.py --repeat 5 --out decode_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import get_codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", default="cachegen,packed,int8")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="decode_speed_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = (torch.randn(2, 4, 512, 3, 64) * torch.logspace(-1, 1, 192).view(1, 1, 1, 3, 64)).half()
    kv = ChunkKV(x, 1)
    codecs = {n: get_codec(n) for n in args.codecs.split(",")}
    encoded = {n: c.encode(kv) for n, c in codecs.items()}
    times: dict[str, list[float]] = {n: [] for n in codecs}
    for _ in range(args.repeat):
        for n, c in codecs.items():
            t = time.perf_counter()
            c.decode(encoded[n])
            times[n].append(time.perf_counter() - t)
    out = {
        n: {"bits": 8 * encoded[n].nbytes / x.numel(), "decode_mb_s": 2 * x.numel() / statistics.median(times[n]) / 1e6}
        for n in codecs
    }
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
