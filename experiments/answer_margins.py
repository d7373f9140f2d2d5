"""Do blended answers turn at near-ties? For each sample: the full prefill's greedy answer, the default
strategy's (engine.run, the store's chunk KV) greedy answer and its per-step margin (top-1 minus top-2
logit on the blended path). If a flip happens only where the blended margin is small, a guard that
switches to exact KV at the first step below a margin threshold (before emitting that token) returns
the full prefill's answer exactly; this script simulates that guard per threshold: same answers, share
of requests that switch, and the step where they switch.

    python experiments/answer_margins.py --demo --cache /tmp/refs
    python experiments/answer_margins.py --data ../../shared/data/cacheblend/musique_s.json --format musique --limit 10
"""

from __future__ import annotations

import argparse
import json

import torch
from answer_turns import add_sample_args, engine_and_samples, reference

from ragkv.eval.runner import sample_chunks

THRESHOLDS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def margins(logits: torch.Tensor) -> list[float]:
    top = logits.float().topk(2, dim=-1).values  # [P, 2]
    return (top[:, 0] - top[:, 1]).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_args(ap, limit=10)
    ap.add_argument("--strategy", default=None, help="default: the engine's default strategy")
    ap.add_argument("--ratio", type=float, default=None)
    ap.add_argument("--out", default="answer_margins.json")
    args = ap.parse_args()
    engine, samples = engine_and_samples(args)
    rows = []
    for n, sample in enumerate(samples):
        chunks = sample_chunks(engine, sample)
        plan = engine.plan(sample.question, chunks)
        key = f"margins-{args.format if not args.demo else 'demo'}-{n + args.offset}-{args.new_tokens}"
        ref = reference(engine, plan, args.new_tokens, args.cache, key)
        engine.ensure_cached(chunks)
        options = {k: v for k, v in (("strategy", args.strategy), ("recompute_ratio", args.ratio)) if v is not None}
        run = engine.run(sample.question, chunks=chunks, reserve=args.new_tokens + 1, **options)
        fused = list(engine.answer_ids(run.blend, args.new_tokens)) or [int(run.blend.logits.argmax())]
        m = margins(engine.teacher_forced_logits(run.blend, torch.tensor(fused)))
        full = ref["answer"]
        turn = next((i for i, (a, b) in enumerate(zip(full, fused)) if a != b), None)
        if turn is None and len(full) != len(fused):
            turn = min(len(full), len(fused))
        full_m = margins(ref["logits"])
        rows.append(
            {
                "id": getattr(sample, "id", n),
                "turn": turn,
                "margin_at_turn": None if turn is None or turn >= len(m) else m[turn],
                "full_margin_at_turn": None if turn is None or turn >= len(full_m) else full_m[turn],
                "min_margin_before_turn": min(m[: (turn if turn is not None else len(m))], default=None),
                "margins": m,
                "recompute": run.blend.recompute_fraction,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "margins"}), flush=True)
    print("| threshold | same answer | switched | mean switch step |")
    print("|---|---|---|---|")
    summary = []
    for tau in THRESHOLDS:
        same = switched = 0
        steps = []
        for r in rows:
            end = r["turn"] if r["turn"] is not None else len(r["margins"])
            low = next((i for i, x in enumerate(r["margins"]) if x < tau), None)
            if low is not None:
                switched += 1
                steps.append(low)
            same += r["turn"] is None or (low is not None and low <= end)
        summary.append({"threshold": tau, "same": same, "switched": switched, "n": len(rows), "steps": steps})
        mean = sum(steps) / len(steps) if steps else float("nan")
        print(f"| {tau} | {same}/{len(rows)} | {switched}/{len(rows)} | {mean:.1f} |")
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
