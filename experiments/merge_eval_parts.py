"""Merge the JSON of `ragkv eval` runs over consecutive parts of one data set (`--offset`) into one
report: the per-sample rows concatenated, the summary recomputed over all of them, the budget curve
redrawn.

    python experiments/merge_eval_parts.py part0.json part10.json --out all.json --curve all.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ragkv.eval.report import markdown_table, plot_curve
from ragkv.eval.runner import summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--curve", default=None)
    args = ap.parse_args()
    reports = sorted((json.loads(p.read_text()) for p in args.parts), key=lambda r: r.get("offset", 0))
    first = reports[0]

    def shape(r: dict) -> tuple:
        return r["dataset"], r["format"], list(r["results"])

    for r in reports[1:]:
        if shape(r) != shape(first):
            raise SystemExit("the parts are not of one data set with the same strategies")
    samples = [row for r in reports for row in r["samples"]]
    merged = {**first, "n": len(samples), "offset": first.get("offset", 0), "results": summarize(samples)}
    merged["samples"] = samples
    merged["parts"] = [str(p) for p in args.parts]
    args.out.write_text(json.dumps(merged, indent=1))
    print(markdown_table(merged["results"]))
    if args.curve:
        title = f"{first['model']} on {Path(first['dataset']).name} (n={len(samples)})"
        plot_curve(merged["results"], args.curve, title)


if __name__ == "__main__":
    main()
