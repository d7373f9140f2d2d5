"""Wall time of `ragkv config` and `ragkv retrieve` from process start, this checkout beside an older
revision, interleaved in one run (issue 26, item 8: both answer without importing torch).

The older revision is extracted with `git archive REV` into a temporary folder; each checkout is
imported through a `ragkv` symlink on PYTHONPATH. One data dir serves both: the demo corpus ingested
once with `--no-kv` (catalog + index only; the converted model is linked from the default data dir so
nothing is converted). Each command's process also reports whether torch was imported.
`python benchmarks/bench_cli_start.py --before 1fd867e --runs 5 --out results-cli-start.json`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # this checkout (the `ragkv` package)
QUESTION = "Who discovered polonium and radium?"
PROBE = """import runpy, sys
sys.argv = ["ragkv", *sys.argv[1:]]
try:
    runpy.run_module("ragkv.cli.main", run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""  # `ragkv ARGV`, then whether torch was imported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_cli_start.py", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision to compare with (e.g. the merge base)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--models", default=None, help="converted models folder (default: DATA_DIR/models)")
    p.add_argument("--out", default="results-cli-start.json")
    args = p.parse_args(argv)
    default_data = Path(os.environ.get("RAGKV_DATA_DIR", "~/.cache/ragkv")).expanduser()
    models = Path(args.models).expanduser() if args.models else default_data / "models"
    with tempfile.TemporaryDirectory(prefix="ragkv-cli-start-") as tmp:
        work = Path(tmp)
        paths = {"before": _extract(args.before, work / "before-src"), "after": ROOT}
        envs = {label: _env(work / label, path) for label, path in paths.items()}
        data = work / "data"
        data.mkdir()
        (data / "models").symlink_to(models)
        demo = ROOT / "cli" / "demo"
        ingest = ["ingest", *map(str, sorted(demo.glob("*.txt"))), "--no-kv", "--quiet", "--data-dir", str(data)]
        _run(ingest, envs["after"])  # setup, not timed (loads the model once)
        commands = {
            "config": ["config", "--data-dir", str(data)],
            "retrieve": ["retrieve", QUESTION, "-k", "5", "--json", "--data-dir", str(data)],
        }
        load_before = os.getloadavg()
        times: dict[str, dict[str, list[float]]] = {c: {label: [] for label in paths} for c in commands}
        torch_seen: dict[str, dict[str, bool]] = {c: {} for c in commands}
        for _ in range(args.runs):
            for command, argv_ in commands.items():
                for label in paths:  # interleaved: both checkouts see the same load
                    seconds, err = _run(argv_, envs[label])
                    times[command][label].append(seconds)
                    torch_seen[command][label] = "torch imported: True" in err
        load_after = os.getloadavg()
    rows = []
    for command, by_label in times.items():
        med = {label: statistics.median(v) for label, v in by_label.items()}
        rows.append(
            dict(
                command=f"ragkv {command}",
                before_s=round(med["before"], 2),
                after_s=round(med["after"], 2),
                speedup=round(med["before"] / med["after"], 1),
                after_min_s=round(min(by_label["after"]), 2),
                torch_before=torch_seen[command]["before"],
                torch_after=torch_seen[command]["after"],
            )
        )
    print(f"{'command':16s} {'before s':>9s} {'after s':>8s} {'speedup':>8s} {'after min':>10s}  torch b/a")
    for r in rows:
        print(
            f"{r['command']:16s} {r['before_s']:9.2f} {r['after_s']:8.2f} {r['speedup']:7.1f}x "
            f"{r['after_min_s']:10.2f}  {r['torch_before']}/{r['torch_after']}"
        )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; medians of {args.runs} runs")
    report = dict(
        rows=rows,
        runs=args.runs,
        before=args.before,
        load_average=[round(load_before[0], 2), round(load_after[0], 2)],
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    )
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def _extract(rev: str, folder: Path) -> Path:
    """The package as of git revision `rev`, in `folder`."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _env(folder: Path, checkout: Path) -> dict[str, str]:
    """An environment whose `import ragkv` is `checkout`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ragkv").symlink_to(checkout)
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(folder)}


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stderr) of `ragkv ARGV` in a fresh interpreter."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"ragkv {' '.join(argv[:2])} failed ({out.returncode}): {out.stderr[-800:]}")
    return seconds, out.stderr


if __name__ == "__main__":
    sys.exit(main())
