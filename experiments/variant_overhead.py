"""What loading neighbour variants costs focus at query time: its TTFT on the demo's prompts with each
chunk loading its variant (the default) vs its base entry (`Focus.choose_sources` set back to the base
rule), interleaved with `full` in one engine over a data dir the demo filled (`ragkv demo --data-dir D`).

    python experiments/variant_overhead.py D --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from importlib import resources

import torch

from ragkv.blend.focus import Focus
from ragkv.blend.strategies import Strategy
from ragkv.engine.engine import Engine

MODES = ("variants", "base", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(data_dir=args.data_dir)
    demo = resources.files("ragkv.cli") / "demo"
    questions = [json.loads(line) for line in (demo / "questions.jsonl").read_text().splitlines() if line.strip()]
    with_variants = Focus.choose_sources

    def base_only(self, keys, store, prefix=None, first_exact=False):
        return Strategy.choose_sources(self, keys, store, prefix, first_exact)

    medians = {m: [] for m in MODES}
    for q in questions:
        chunks = [h.token_ids for h in engine.retrieve(q["question"], 3, namespace="demo")]
        ttft = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                Focus.choose_sources = with_variants if mode == "variants" else base_only
                strategy = "full" if mode == "full" else "focus"
                ttft[mode].append(engine.run(q["question"], chunks=chunks, namespace="demo", strategy=strategy).ttft_ms)
        for mode in MODES:
            medians[mode].append(statistics.median(ttft[mode]))
        print(q["id"], {m: round(medians[m][-1]) for m in MODES}, flush=True)
    Focus.choose_sources = with_variants
    print("median ms", {m: round(statistics.median(v)) for m, v in medians.items()})
    ratios = {m: statistics.median([f / x for f, x in zip(medians["full"], medians[m])]) for m in ("variants", "base")}
    print("speedup vs full (median of per-question ratios)", {m: round(r, 3) for m, r in ratios.items()})


if __name__ == "__main__":
    main()
