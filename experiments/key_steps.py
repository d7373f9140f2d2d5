"""How cachegen should size its key (and value) steps across the channels of a layer, at ~1.9 bits/value.

A key error e_c in channel c moves a query's attention logit by q_c * e_c, so at a given rate the
logit error sum_c E[q_c^2] step_c^2 / 12 is smallest with step_c ~ 1 / rms(q_c) (reverse
water-filling), not with step_c ~ std_c as CacheGen sizes it. Variants, each answering with
cacheblend@0.15 against the full prefill (experiments/fidelity.py):
- per channel (CacheGen): step_c = 6 std_c / bins, exponents 1;
- one step per layer with the same geometric mean (capped at 3 std_c), for K (exponent 0), then for
  K and V with re-balanced bins (the default since);
- q-weighted K: step_c ~ 1 / rms(q_c), rms measured on the post-RoPE queries of `--calibration` other
  records' full prefills (the informed reference: it needs the model's query statistics).

    python experiments/key_steps.py --limit 2 --calibration 2 --out key_steps.json            # tuned on
    python experiments/key_steps.py --skip 4 --limit 4 --calibration 2 --out key_steps_heldout.json
"""

from __future__ import annotations

import argparse
import json

import torch
from fidelity import Prompt, report

import ragkv.compression.cachegen as cachegen
from ragkv.blend import blend, make_strategy
from ragkv.compression.cachegen import CacheGenCodec, CacheGenConfig
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.shared_data import shared_data

OLD = dict(key_bins=(8, 8, 8, 10, 10, 5), value_bins=(3, 3, 3, 4, 4, 2))  # the schedule fitted with std steps
PER_CHANNEL_V = dict(value_bins=(3, 3, 3, 4, 4, 2), value_step_exponent=1.0)


class QueryWeightedKeys(CacheGenCodec):
    """cachegen whose key steps follow 1 / rms(q_c) per layer (`energy`: [L, C] mean q^2 per kv channel),
    geometric mean as the default's, capped at 3 std_c; the decoder is unchanged (steps are stored)."""

    def __init__(self, energy: torch.Tensor, config: CacheGenConfig) -> None:
        super().__init__(config)
        self.energy = energy

    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        rms_q = self.energy[layer].double().clamp_min(float(self.energy[layer].max()) * 1e-8).sqrt()  # [C]
        original = cachegen.quant_steps

        def steps(x, bins, _key_exponent, value_exponent):
            out = original(x, bins, 1.0, value_exponent).double()  # [2, C]: K 6 std / bins
            std = x.std(dim=1, unbiased=False)[0]  # [C]
            k = torch.exp(out[0].log().mean() + rms_q.log().mean()) / rms_q
            out[0] = k.minimum(3.0 * std.clamp_min(1e-6))
            return out.half()

        cachegen.quant_steps = steps
        try:
            return super().encode_layer(layer_kv, layer, num_layers)
        finally:
            cachegen.quant_steps = original


def query_energy(engine, sample) -> torch.Tensor:
    """[L, C_kv] mean post-RoPE q^2 per kv channel over a full prefill (query heads summed per group)."""
    model = engine.model
    plan = engine.plan(sample.question, engine.tokenize_chunks(sample.chunks))
    energy: dict[int, torch.Tensor] = {}
    original = model.qkv

    def recording(layer, h, cos, sin):
        q, k, v = original(layer, h, cos, sin)
        e = q.float().pow(2).mean(0).view(k.shape[1], q.shape[1] // k.shape[1], -1).sum(1)  # [H_kv, D]
        energy[layer] = energy.get(layer, 0) + e.flatten()
        return q, k, v

    model.qkv = recording
    try:
        blend(model, plan, make_strategy("full"), [])
    finally:
        del model.qkv
    return torch.stack([energy[i] for i in range(model.num_layers)])  # [L, C]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data("cacheblend", "musique_s.json")))
    ap.add_argument("--format", default="musique")
    ap.add_argument("--skip", type=int, default=0, help="records to skip first (held-out runs)")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument(
        "--calibration", type=int, default=2, help="records after --limit whose queries give q-weighted's rms"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="key_steps.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("smollm2")
    samples = load_samples(args.data, args.format, limit=args.skip + args.limit + args.calibration)[args.skip :]
    energy = sum(query_energy(engine, s) for s in samples[args.limit :])
    variants = {
        "per channel K and V, K (8,8,8,10,10,5)": CacheGenCodec(
            CacheGenConfig(**OLD, key_step_exponent=1.0, value_step_exponent=1.0)
        ),
        "one K step per layer, K (7,7,8,10,10,4)": CacheGenCodec(
            CacheGenConfig(key_bins=(7, 7, 8, 10, 10, 4), **PER_CHANNEL_V)
        ),
        "one K and one V step per layer, K (6,6,7,9,9,4) V (3,3,4,4,4,2) (default)": CacheGenCodec(),
        "q-weighted K, K (6,6,6,8,8,4)": QueryWeightedKeys(
            energy, CacheGenConfig(key_bins=(6, 6, 6, 8, 8, 4), **PER_CHANNEL_V)
        ),
    }
    rows = []
    for sample in samples[: args.limit]:
        prompt = Prompt.of(engine, sample)
        row = {
            "id": sample.id,
            "uncompressed": {"bits": 16.0, **dict(zip(("kl_mean", "top1"), prompt.fidelity(prompt.kvs)))},
        }
        for name, codec in variants.items():
            encoded = [codec.encode(kv) for kv in prompt.kvs]
            bits = sum(e.nbytes for e in encoded) * 8 / sum(kv.kv.numel() for kv in prompt.kvs)
            row[name] = {
                "bits": bits,
                **dict(zip(("kl_mean", "top1"), prompt.fidelity([codec.decode(e) for e in encoded]))),
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, args.out, data=args.data, calibration_records=args.calibration)


if __name__ == "__main__":
    main()
