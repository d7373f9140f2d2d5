"""`ragkv bench NAME [ARGS...]`: run a benchmark script from the source checkout's `benchmarks/`.

Benchmarks are scripts, not part of the installed package: they live beside the package source
(`benchmarks/bench_NAME.py`) and run as `python benchmarks/bench_NAME.py ARGS...` too.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def available() -> list[str]:
    """Names of the benchmark scripts found beside the package source (empty in a wheel install)."""
    if not BENCHMARKS.is_dir():
        return []
    names = [p.stem.removeprefix("bench_") for p in BENCHMARKS.glob("bench_*.py")]
    return sorted([*names, *(p.stem for p in BENCHMARKS.glob("loadtest.py"))])


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from the source checkout's benchmarks/ (`ragkv bench NAME --help`)",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", dest="show_help", help="list the benchmarks")
    p.add_argument("name", nargs="?", help="benchmark name")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=run)


def script_for(name: str) -> Path:
    """The benchmark script called `name`; ValueError naming the available ones when there is none."""
    names = available()
    if not names:
        raise ValueError(
            f"no benchmarks/ folder beside the package ({BENCHMARKS}): benchmarks ship with the source "
            "checkout, not the wheel"
        )
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    return BENCHMARKS / (name + ".py" if name == "loadtest" else f"bench_{name}.py")


def run(args: argparse.Namespace) -> int:
    if args.show_help and args.name:  # `ragkv bench NAME --help`: the benchmark's own help
        args.args = ["--help", *args.args]
    if not args.name:
        print("usage: ragkv bench NAME [ARGS...]; NAME is one of: " + (", ".join(available()) or "(none found)"))
        return 0
    script = script_for(args.name)
    saved = sys.argv, list(sys.path)
    sys.argv = [f"ragkv bench {args.name}", *args.args]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    finally:
        sys.argv, sys.path[:] = saved
    return 0
