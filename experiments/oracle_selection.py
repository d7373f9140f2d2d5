"""Oracle token selection for CacheBlend: is the 15% budget the limit, or the choice of tokens?

For each prompt, the full prefill and naive fusion give every chunk token's true KV deviation at every
layer. Oracles rank tokens by that deviation (all layers summed, layer 1 only, the later half, the
last layer) and recompute the top `ratio` of chunk tokens exactly as `cacheblend` does after its check
layer. kl_mean is teacher-forced on the full prefill's greedy answer (16 tokens), as `ragkv eval`.

    python experiments/oracle_selection.py --limit 4 --out oracle.json
"""

from __future__ import annotations

import argparse
import json

import torch

from ragkv.blend import blend, make_strategy
from ragkv.blend.select import budget, keep_top
from ragkv.blend.strategies import CacheBlend
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.metrics import kl_per_position
from ragkv.eval.shared_data import shared_data


class OracleSelection(CacheBlend):
    """CacheBlend with a given score per prompt row instead of the check layer's deviation."""

    def __init__(self, ratio: float, score_by_row: torch.Tensor) -> None:
        super().__init__(ratio)
        self.score_by_row = score_by_row  # [N]

    def narrow(self, step, plan, rows, is_cached, deviation, num_cached):
        return keep_top(is_cached, self.score_by_row[rows], budget(self.fraction(step), num_cached))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data("cacheblend", "musique_s.json")))
    ap.add_argument("--format", default="musique")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--ratios", default="0.15,0.3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="oracle.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained("smollm2")
    ratios = [float(r) for r in args.ratios.split(",")]
    rows_out = []
    for sample in load_samples(args.data, args.format, limit=args.limit):
        chunks = engine.tokenize_chunks(sample.chunks)
        plan = engine.plan(sample.question, chunks)
        keys, _, _ = engine.ensure_cached(chunks)

        def run(strategy):
            found = [] if strategy.reuse == "none" else engine.store.get_layered_many(keys)
            sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, found)]
            return blend(engine.model, plan, strategy, sources, reserve=16)

        full = run(make_strategy("full"))
        forced = torch.tensor(list(engine.answer_ids(full, 16)) or [int(full.logits.argmax())])
        reference = engine.teacher_forced_logits(full, forced)

        def kl(result) -> float:
            return float(kl_per_position(reference, engine.teacher_forced_logits(result, forced)).mean())

        naive = run(make_strategy("naive"))
        in_chunk = torch.zeros(plan.num_tokens, dtype=torch.bool)
        for start, end in plan.chunk_spans:
            in_chunk[start:end] = True
        per_layer = []  # [L] of [N]: squared K+V deviation of naive from full, normalised per layer
        for (full_k, full_v), (naive_k, naive_v) in zip(full.prompt_kv(), naive.prompt_kv()):
            d = (full_k[0] - naive_k[0]).pow(2).sum((0, 2)) + (full_v[0] - naive_v[0]).pow(2).sum((0, 2))  # [N]
            per_layer.append(d / d[in_chunk].mean())
        dev = torch.stack(per_layer)  # [L, N]
        half = engine.model.num_layers // 2
        oracles = {
            "oracle_all_layers": dev.sum(0),
            "oracle_layer1": dev[1],
            "oracle_late_half": dev[half:].sum(0),
            "oracle_last_layer": dev[-1],
        }
        row = {"id": sample.id, "prompt_tokens": plan.num_tokens, "naive": kl(naive)}
        for r in ratios:
            row[f"cacheblend@{r:g}"] = kl(run(make_strategy("cacheblend", r)))
            for name, score in oracles.items():
                row[f"{name}@{r:g}"] = kl(run(OracleSelection(r, score)))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows_out.append(row)
    labels = [k for k in rows_out[0] if k not in ("id", "prompt_tokens")]
    means = {k: sum(r[k] for r in rows_out) / len(rows_out) for k in labels}
    print("\n| selection | kl_mean | / naive |\n|---|---|---|")
    for k, v in means.items():
        print(f"| {k} | {v:.4f} | {v / means['naive']:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"data": args.data, "n": len(rows_out), "mean_kl": means, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
