"""Where the demo's fused TTFT goes: the 10 shipped questions (3 retrieved chunks each) answered with the
default strategy and with `full`, interleaved, median of `--repeats` per question after a warm-up, and
the mean TTFT parts (`RunResult.parts_ms`) of the fused runs. Run it for two checkouts one after the
other (`PYTHONPATH=<folder holding ragkv>`) to compare code on one machine.

    python experiments/ttft_parts.py --repeats 5 --label new
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from ragkv.cli.demo import shipped_demo
from ragkv.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="this code")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths, questions = shipped_demo()
    scratch = tempfile.TemporaryDirectory(prefix="ragkv-ttft-parts-")  # removed when the process exits
    engine = Engine.from_pretrained(data_dir=scratch.name)
    engine.ingest(paths, namespace="demo")
    chunks = {q["id"]: [h.token_ids for h in engine.retrieve(q["question"], 3, namespace="demo")] for q in questions}
    for q in questions:  # warm-up: the first forward passes of a process are slow
        engine.run(q["question"], chunks=chunks[q["id"]], namespace="demo")
    fused, full, parts = [], [], {}
    for q in questions:
        times = {"fused": [], "full": []}
        for _ in range(args.repeats):
            run = engine.run(q["question"], chunks=chunks[q["id"]], namespace="demo")
            times["fused"].append(run.ttft_ms)
            for part, ms in run.parts_ms.items():
                parts.setdefault(part, []).append(ms)
            times["full"].append(
                engine.run(q["question"], chunks=chunks[q["id"]], namespace="demo", strategy="full").ttft_ms
            )
        fused.append(statistics.median(times["fused"]))
        full.append(statistics.median(times["full"]))
    speedups = [b / a for a, b in zip(fused, full)]
    print(
        f"{args.label}: fused {statistics.median(fused):.0f} ms, full {statistics.median(full):.0f} ms, "
        f"median speedup {statistics.median(speedups):.3f}x; mean parts ms "
        f"{ {k: round(statistics.mean(v), 1) for k, v in parts.items() if statistics.mean(v) > 0.3} }; "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
