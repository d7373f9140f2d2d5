"""What other answer-guard thresholds would have done on a `ragkv eval` run, from its rows alone.

Each guarded row records the fused path's margin at every step (`fused_margins`, top-1 minus top-2
logit along the fused KV's own greedy answer) and where that answer first left the full prefill's
(`fused_turn`). A guard at threshold t switches at the first step whose margin is under t; from then on
the answer is the full prefill's: read whole, it takes back what had left before (same answer whenever
it switched); streamed, it is the full prefill's only if it had not left before the switch. A switch at
step 0 adds one exact prefill to the TTFT (priced at that sample's `full` TTFT).

    python experiments/guard_thresholds.py run.json [more.json] --label focus@0.15 --out thresholds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def at_threshold(samples: list[dict], label: str, t: float) -> dict:
    """Same answers (read whole, streamed), switches and the median TTFT speedup vs the model's own
    forward, had the guard been at `t`."""
    whole = streamed = switched = at_zero = 0
    speedups, agree_whole, agree_streamed = [], [], []
    for sample in samples:
        row, full = sample[label], sample["full"]
        margins, turn = row["fused_margins"], row["fused_turn"]
        switch = next((i for i, m in enumerate(margins) if m < t), None)
        fused_ttft = row["ttft_ms"] - row["parts_ms"].get("guard", 0.0)  # the fusion alone
        ttft = fused_ttft + (full["ttft_ms"] if switch == 0 else 0.0)
        speedups.append(row["hf_ttft_ms"] / ttft)
        whole += switch is not None or turn is None
        streamed += turn is None or (switch is not None and switch <= turn)
        fused_agree = row["agree_prefix_unguarded"]  # the fused answer's own agreeing prefix
        agree_whole.append(1.0 if switch is not None else fused_agree)
        agree_streamed.append(1.0 if switch is not None and (turn is None or switch <= turn) else fused_agree)
        switched += switch is not None
        at_zero += switch == 0
    n = len(samples)
    return {
        "threshold": t,
        "same_answer": whole / n,
        "same_answer_streamed": streamed / n,
        "agree_prefix": statistics.fmean(agree_whole),
        "agree_prefix_streamed": statistics.fmean(agree_streamed),
        "switched": switched / n,
        "switched_at_step_0": at_zero / n,
        "speedup_vs_hf_median": statistics.median(speedups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="ragkv eval JSON (parts of one set are concatenated)")
    ap.add_argument("--label", default=None, help="the strategy label (default: the first guarded one)")
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    samples = [s for path in args.runs for s in json.loads(path.read_text())["samples"]]
    label = args.label or next(k for k, v in samples[0].items() if v.get("fused_margins"))
    samples = [s for s in samples if "fused_margins" in s[label]]
    empty = sum(not s[label]["fused_margins"] for s in samples)  # an answer that was EOS at once: never switched
    rows = [at_threshold(samples, label, float(t)) for t in args.thresholds.split(",")]
    print(f"{label}, n={len(samples)} ({empty} empty fused answers, counted as never switched)")
    print(
        "| threshold | same answer (read whole) | agree prefix | same (streamed) | agree (streamed) | switched "
        "| at step 0 | speedup vs HF (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threshold']:g} | {r['same_answer']:.2f} | {r['agree_prefix']:.3f} "
            f"| {r['same_answer_streamed']:.2f} "
            f"| {r['agree_prefix_streamed']:.3f} | {r['switched']:.2f} "
            f"| {r['switched_at_step_0']:.2f} | {r['speedup_vs_hf_median']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"label": label, "n": len(samples), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
