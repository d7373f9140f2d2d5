"""Token selection at equal recompute: CacheBlend's KV deviation vs the question's attention (scout pass
before layer 0) vs cachecraft, on the same prompts, kl_mean / top-1 against the full prefill.

kl_mean and top-1 are teacher-forced on the full prefill's greedy answer (16 tokens), as `ragkv eval`.
Each `--variants` entry is `strategy@ratio` with optional `;key=value` BlendConfig overrides, e.g.
`cacheblend+query@0.15;scout_layers=1,2`. cachecraft's chunk metadata is recorded first by a context
pass over the sample's chunks in `--record-order` (reversed by default: a different context).

    python experiments/selection_sweep.py --limit 4 --variants "cacheblend@0.15,cacheblend+query@0.15"
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from ragkv.blend import BlendConfig, blend, make_strategy
from ragkv.blend.chunk_metadata import record_context
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.metrics import kl_per_position, top1_agreement
from ragkv.eval.shared_data import shared_data
from ragkv.storage.metadata import metadata_store


def parse_variant(text: str) -> tuple[str, str, float, BlendConfig]:
    """`name@ratio;key=v1,v2;key=v` -> (label, name, ratio, config)."""
    head, *opts = text.split(";")
    name, _, ratio = head.partition("@")
    config = BlendConfig()
    for opt in opts:
        key, _, value = opt.partition("=")
        current = getattr(config, key)
        if isinstance(current, tuple):
            parsed = tuple(int(v) for v in value.split("+"))
        else:
            parsed = type(current)(value)
        config = replace(config, **{key: parsed})
    return text, name, float(ratio or 0.0), config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data("cacheblend", "musique_s.json")))
    ap.add_argument("--format", default="musique")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--offset", type=int, default=0, help="skip this many samples first")
    ap.add_argument("--max-chunks", type=int, default=None, help="keep at most this many passages per sample")
    ap.add_argument("--variants", default="naive,cacheblend@0.15,cacheblend+query@0.15")
    ap.add_argument("--record-order", default="reversed", choices=("reversed", "same", "none"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="selection_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ragkv.engine.prompt import template_for

    engine = Engine.from_pretrained("smollm2")
    engine.template = template_for(args.format)
    variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    rows = []
    samples = load_samples(args.data, args.format, args.limit + args.offset, args.max_chunks)[args.offset :]
    for sample in samples:
        chunks = engine.tokenize_chunks(sample.chunks)
        plan = engine.plan(sample.question, chunks)
        keys, _, _ = engine.ensure_cached(chunks)
        sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, engine.store.get_layered_many(keys))]
        t0 = time.perf_counter()
        full = blend(engine.model, plan, make_strategy("full"), [], reserve=16)
        t_full = time.perf_counter() - t0
        forced = torch.tensor(list(engine.answer_ids(full, 16)) or [int(full.logits.argmax())])
        reference = engine.teacher_forced_logits(full, forced)
        store = metadata_store(engine.store)
        if args.record_order != "none":
            order = list(range(len(chunks)))[:: -1 if args.record_order == "reversed" else 1]
            context_plan = engine.plan(sample.question, [chunks[i] for i in order])
            context_sources = [
                (s, src) for (s, _), (_, src) in zip(context_plan.chunk_spans, [sources[i] for i in order])
            ]
            record_context(engine.model, context_plan, context_sources, [keys[i] for i in order], store)
        row = {"id": sample.id, "prompt_tokens": plan.num_tokens, "full_s": t_full}
        for label, name, ratio, config in variants:
            strategy = make_strategy(name, ratio, config)
            if hasattr(strategy, "bind"):
                strategy.bind(keys, store)
            t0 = time.perf_counter()
            result = blend(engine.model, plan, strategy, sources, reserve=16)
            seconds = time.perf_counter() - t0
            logits = engine.teacher_forced_logits(result, forced)
            row[label] = {
                "kl_mean": float(kl_per_position(reference, logits).mean()),
                "top1": top1_agreement(reference, logits),
                "recompute_fraction": result.recompute_fraction,
                "seconds": seconds,
                "speedup": t_full / seconds,
            }
        print(json.dumps(row), flush=True)  # per sample, so a run cut short still reports
        rows.append(row)
    labels = [v[0] for v in variants]
    mean = {k: {m: sum(r[k][m] for r in rows) / len(rows) for m in rows[0][k]} for k in labels}
    base = mean.get("naive", {}).get("kl_mean")
    print(f"\n{args.data} n={len(rows)}\n| variant | kl_mean | / naive | top1 | recompute | speedup vs full |")
    print("|---|---|---|---|---|---|")
    for k, m in mean.items():
        rel = f"{m['kl_mean'] / base:.2f}" if base else ""
        cells = [
            f"{m['kl_mean']:.4f}",
            rel,
            f"{m['top1']:.3f}",
            f"{m['recompute_fraction']:.3f}",
            f"{m['speedup']:.2f}",
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")
    with open(args.out, "w") as f:
        json.dump(
            {"data": args.data, "n": len(rows), "record_order": args.record_order, "mean": mean, "rows": rows},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
