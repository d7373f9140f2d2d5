"""What neighbour variants cost focus at query time on the demo's prompts: two engines in one process,
one ingesting the demo's passages with neighbour variants (the default) and one without, each request
run on both in turn (interleaved, median of 5), with the TTFT parts and the recompute fraction the
adaptive budget chose.

    python experiments/variant_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from ragkv.cli.demo import shipped_demo
from ragkv.engine.engine import Engine
from ragkv.engine.ingest import IngestConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths, questions = shipped_demo()
    engines, scratches = {}, []
    for name, k in (("variants", 2), ("base", 0)):
        scratch = tempfile.TemporaryDirectory(prefix="ragkv-overhead-")  # removed when the process exits
        engine = Engine.from_pretrained(data_dir=scratch.name)
        scratches.append(scratch)
        engine.ingest(paths, namespace="demo", config=IngestConfig(progress=False, neighbour_variants=k))
        engines[name] = engine
    parts = {n: {} for n in engines}
    ttft = {n: [] for n in engines}
    for q in questions:
        chunks = {n: [h.token_ids for h in e.retrieve(q["question"], 3, namespace="demo")] for n, e in engines.items()}
        times, recompute = {n: [] for n in engines}, {}
        for rep in range(args.repeats):
            for n, engine in engines.items():
                run = engine.run(q["question"], chunks=chunks[n], namespace="demo")
                times[n].append(run.ttft_ms)
                recompute[n] = run.blend.recompute_fraction
                if rep:  # the first run of a prompt warms its entries
                    for part, ms in run.parts_ms.items():
                        parts[n].setdefault(part, []).append(ms)
        for n in engines:
            ttft[n].append(statistics.median(times[n]))
        print(q["id"], {n: round(ttft[n][-1]) for n in engines}, {n: round(r, 3) for n, r in recompute.items()})
    print("median TTFT ms", {n: round(statistics.median(v)) for n, v in ttft.items()})
    print(
        "mean parts ms",
        {
            n: {k: round(statistics.mean(v), 1) for k, v in p.items() if statistics.mean(v) > 0.3}
            for n, p in parts.items()
        },
    )


if __name__ == "__main__":
    main()
