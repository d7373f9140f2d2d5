"""The GPU-decodable `packed` codec against `cachegen` at about equal bits/value (CPU evidence for issue 12).

Per prompt the chunk KV (fp16) goes through each variant; each answers with cacheblend@0.15 and is
compared with the full prefill (kl_mean, top-1; experiments/fidelity.py). Bits count the payload.

    python experiments/packed_vs_cachegen.py --skip 4 --limit 2 --out packed_vs_cachegen.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from fidelity import Prompt, report

from ragkv.compression.cachegen import CacheGenCodec, CacheGenConfig
from ragkv.compression.packed import PackedCodec, PackedConfig
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.shared_data import shared_data

VARIANTS = {
    "cachegen default": lambda: CacheGenCodec(),
    "cachegen K (8,8,10,12,12,6) V (4,4,5,6,6,3)": lambda: CacheGenCodec(
        CacheGenConfig(key_bins=(8, 8, 10, 12, 12, 6), value_bins=(4, 4, 5, 6, 6, 3))
    ),
    "packed K2 V2": lambda: PackedCodec(PackedConfig(key_bits=(2,), value_bits=(2,))),
    "packed K3 V2": lambda: PackedCodec(PackedConfig(key_bits=(3,), value_bits=(2,))),
    "packed K3 V2, V per token (1 x 64)": lambda: PackedCodec(
        PackedConfig(key_bits=(3,), value_bits=(2,), value_group=(1, 64))
    ),
    "packed K3 V2, K per 64 tokens": lambda: PackedCodec(
        PackedConfig(key_bits=(3,), value_bits=(2,), key_group=(64, 1))
    ),
    "packed K4 V2": lambda: PackedCodec(PackedConfig(key_bits=(4,), value_bits=(2,))),
    # `ragkv calibrate` at 2.5 bits/value from musique record 1's sensitivity (3 bands, probe 2 bits)
    "packed calibrated @2.5, K (3,2,1) V (5,2,1)": lambda: PackedCodec(
        PackedConfig(key_bits=(3, 2, 1), value_bits=(5, 2, 1))
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data("cacheblend", "musique_s.json")))
    ap.add_argument("--format", default="musique")
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated variant names")
    ap.add_argument("--out", default="packed_vs_cachegen.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    engine = Engine.from_pretrained("smollm2")
    names = [n for n in args.variants.split(";") if n]
    rows = []
    for sample in load_samples(args.data, args.format, args.skip + args.limit, args.max_chunks)[args.skip :]:
        prompt = Prompt.of(engine, sample)
        row = {
            "id": sample.id,
            "uncompressed": {
                "bits": 16.0,
                "rel_error": 0.0,
                **dict(zip(("kl_mean", "top1"), prompt.fidelity(prompt.kvs))),
            },
        }
        values = sum(kv.kv.numel() for kv in prompt.kvs)
        for name in names:
            codec = VARIANTS[name]()
            t0 = time.perf_counter()
            encoded = [codec.encode(kv) for kv in prompt.kvs]
            t1 = time.perf_counter()
            hats = [codec.decode(e) for e in encoded]
            t2 = time.perf_counter()
            err = float(
                torch.cat([(h.kv.float() - kv.kv.float()).flatten() for h, kv in zip(hats, prompt.kvs)]).norm()
                / torch.cat([kv.kv.float().flatten() for kv in prompt.kvs]).norm()
            )
            row[name] = {
                "bits": sum(e.nbytes for e in encoded) * 8 / values,
                "rel_error": err,
                "encode_s": t1 - t0,
                "decode_s": t2 - t1,
                **dict(zip(("kl_mean", "top1"), prompt.fidelity(hats))),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, args.out, data=args.data, skip=args.skip)


if __name__ == "__main__":
    main()
