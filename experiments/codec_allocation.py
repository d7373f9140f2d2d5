"""Where cachegen's error hurts a blended answer, and how bits trade against kl_mean per bin schedule.

Per prompt: the chunk KV (fp16) goes through cachegen; (1) sensitivity: only a part of it is replaced by
its decoded copy (K only, V only, one band of six layers) with the default schedule; (2) schedules: the
whole KV through each key/value bin schedule. Each variant answers with `cacheblend@0.15` and is
compared with the full prefill (kl_mean, top-1, teacher-forced on full's greedy answer, 16 tokens).

    python experiments/codec_allocation.py --limit 2 --out codec_allocation.json
"""

from __future__ import annotations

import argparse
import json

import torch
from fidelity import Prompt, report

from ragkv.chunk_cache import ChunkKV
from ragkv.compression.cachegen import CacheGenCodec, CacheGenConfig
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.shared_data import shared_data

SCHEDULES = {  # name: (key_bins, value_bins), per equal band of layers, early first
    "K=V (6,5,4)": ((6, 5, 4), (6, 5, 4)),
    "K=V 8": ((8,), (8,)),
    "K=V 12": ((12,), (12,)),
    "K=V 16": ((16,), (16,)),
    "K8-10 V4-5": ((8, 8, 8, 10, 10, 5), (4, 4, 4, 5, 5, 3)),
    "K8-10 V3-4": ((8, 8, 8, 10, 10, 5), (3, 3, 3, 4, 4, 2)),
    "K6-12 V3-4": ((6, 8, 8, 12, 12, 4), (3, 3, 4, 4, 4, 2)),
    "K8-12 V2-4": ((8, 8, 10, 12, 10, 4), (2, 3, 3, 4, 4, 2)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data("cacheblend", "musique_s.json")))
    ap.add_argument("--format", default="musique")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--out", default="codec_allocation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("smollm2")
    num_layers = engine.model.num_layers
    parts = (
        {}
        if args.no_sensitivity
        else {
            "K only": (slice(0, 1), slice(None)),
            "V only": (slice(1, 2), slice(None)),
            **{
                f"layers {a}-{min(a + 5, num_layers - 1)}": (slice(None), slice(a, a + 6))
                for a in range(0, num_layers, 6)
            },
        }
    )
    rows = []
    for sample in load_samples(args.data, args.format, limit=args.limit):
        prompt = Prompt.of(engine, sample)
        kvs, fidelity = prompt.kvs, prompt.fidelity
        row = {
            "id": sample.id,
            "uncompressed": {"bits": 16.0, "rel_error": 0.0, **dict(zip(("kl_mean", "top1"), fidelity(kvs)))},
        }
        default = CacheGenCodec(
            CacheGenConfig(key_bins=(8, 8, 8, 10, 10, 5), value_bins=(3, 3, 3, 4, 4, 2), key_step_exponent=1.0)
        )  # the study ran with per-channel key steps
        decoded = [default.decode(default.encode(kv)).kv for kv in kvs]
        for name, index in parts.items():
            mixed = []
            for kv, hat in zip(kvs, decoded):
                x = kv.kv.clone()
                x[index] = hat[index]
                mixed.append(ChunkKV(x, kv.pos0))
            row[f"default, {name}"] = dict(zip(("kl_mean", "top1"), fidelity(mixed)))
        for name, (key_bins, value_bins) in SCHEDULES.items():
            codec = CacheGenCodec(CacheGenConfig(key_bins=key_bins, value_bins=value_bins, key_step_exponent=1.0))
            encoded = [codec.encode(kv) for kv in kvs]
            hats = [codec.decode(e) for e in encoded]
            bits = sum(e.nbytes for e in encoded) * 8 / sum(kv.kv.numel() for kv in kvs)
            err = float(
                torch.cat([(h.kv.float() - kv.kv.float()).flatten() for h, kv in zip(hats, kvs)]).norm()
                / torch.cat([kv.kv.float().flatten() for kv in kvs]).norm()
            )
            row[name] = {"bits": bits, "rel_error": err, **dict(zip(("kl_mean", "top1"), fidelity(hats)))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, args.out, data=args.data)


if __name__ == "__main__":
    main()
