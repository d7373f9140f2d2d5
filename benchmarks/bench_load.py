"""`ragkv bench load`: many users at once against a sidecar the bench starts itself.

For each scheduler (`--schedulers batch,one`: the sidecar's `server.scheduler`), a `ragkv serve` from
this checkout on a free loopback port with its own temporary data folder and a RAM chunk store; for
each strategy and each number of concurrent clients, a fresh slice of the data set's questions (with
their passages) is sent twice: `cold` (the passages are new to the cache) then `warm` (the same
requests again, every chunk cached). Each pass reports requests/s, completion tokens/s and the TTFT
the clients saw (p50/p95: queue + fusion + first token), with the server's engine TTFT and queue time.
Writes JSON and a plot (throughput and p95 TTFT against clients), and prints a markdown table; with
`--timeline` the JSON also lists every request (when it was sent, its first piece, its end, its TTFT
parts as the server reports them: where a loaded request's time goes).

    ragkv bench load --clients 1,4,8,16 --requests 3 --strategies cacheblend --out load.json
    ragkv bench load --clients 8 --schedulers one,batch --strategies cacheblend,full,prefix

Requests come from `--data` (CacheBlend's MuSiQue JSON; default `cacheblend/musique_s.json` under the
shared data folder, eval/shared_data.py), or the built-in demo set (`--demo`, or when the file is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import tempfile
from contextlib import ExitStack
from pathlib import Path

from load_clients import dataset_samples, demo_samples, run_pass
from sidecar_procs import start_sidecar, stop

from ragkv.eval.shared_data import shared_data

COLUMNS = ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "engine_ttft_p50_ms", "queue_p50_ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ragkv bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8,16", help="numbers of concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=3, help="requests per client in each pass")
    p.add_argument("--strategies", default="cacheblend,full,prefix", help="comma-separated (cacheblend: the default)")
    p.add_argument("--schedulers", default="one,batch", help="sidecar schedulers to compare, comma-separated")
    p.add_argument("--data", default=None, help="MuSiQue JSON (default: the shared data's cacheblend/musique_s.json)")
    p.add_argument("--demo", action="store_true", help="use the built-in demo questions and passages")
    p.add_argument("--passages", type=int, default=3, help="passages per request")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request")
    p.add_argument("--batch-tokens", type=int, default=None, help="the batch token budget (default: by device)")
    p.add_argument(
        "--join-tokens",
        type=int,
        default=None,
        help="prompt tokens joining the batch per turn (default: the sidecar's, the whole batch budget)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="the sidecar's torch threads")
    p.add_argument("--model", default=None, help="the sidecar's model (default: its settings, smollm2)")
    p.add_argument(
        "--timeline", action="store_true", help="list every request in the JSON: sent, first piece, end, TTFT parts"
    )
    p.add_argument("--out", default="load.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def samples_for(args: argparse.Namespace) -> tuple[list, str]:
    path = Path(args.data) if args.data else shared_data("cacheblend", "musique_s.json")
    if args.demo or not path.exists():
        if not args.demo:
            print(f"data set {path} not found: using the built-in demo set")
        return demo_samples(args.passages), "demo"
    return dataset_samples(path, args.passages), path.name


def sidecar_settings(args: argparse.Namespace, scheduler: str) -> dict[str, str]:
    env = {
        "RAGKV_SERVER__SCHEDULER": scheduler,
        "RAGKV_MAX_NEW_TOKENS": str(args.max_tokens),
        "RAGKV_SERVER__QUEUE_SIZE": "512",
    }
    env["RAGKV_TORCH_THREADS"] = str(args.torch_threads)
    if args.batch_tokens:
        env["RAGKV_BATCH_TOKENS"] = str(args.batch_tokens)
    if args.join_tokens:
        env["RAGKV_SERVER__JOIN_TOKENS"] = str(args.join_tokens)
    if args.model:
        env["RAGKV_MODEL"] = args.model
    return env


def run(args: argparse.Namespace) -> dict:
    """Every scheduler's sidecar runs at once (an idle one costs no CPU) and their passes alternate, so
    that on a shared machine each comparison is measured under about the same load."""
    samples, source = samples_for(args)
    clients = [int(c) for c in args.clients.split(",")]
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ragkv-load-") as tmp, ExitStack() as procs:
        urls = {}
        for scheduler in args.schedulers.split(","):
            workdir = Path(tmp) / scheduler
            workdir.mkdir()
            urls[scheduler], proc = start_sidecar(workdir, scheduler, None, workdir, sidecar_settings(args, scheduler))
            procs.callback(stop, proc)
        offset = 0  # each (strategy, clients) round takes the next slice: cold means new to every sidecar
        for strategy in args.strategies.split(","):
            for c in clients:
                n = c * args.requests
                batch = [samples[(offset + i) % len(samples)] for i in range(n)]
                offset += n
                for cache in ("cold", "warm"):
                    for scheduler, url in urls.items():
                        r = asyncio.run(run_pass(url, batch, c, strategy, args.max_tokens, args.timeline))
                        rows.append({"scheduler": scheduler, "strategy": strategy, "clients": c, "cache": cache, **r})
                        print(_row_line(rows[-1]), flush=True)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_average": os.getloadavg(),  # at the end; the machine may be shared
        "load_average_before": load_before,
        "data": source,
        "samples": len(samples),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "rows": rows,
        "headline": headline(rows),
    }


def _row_line(row: dict) -> str:
    return (
        f"{row['scheduler']:>5} {row['strategy']:>10} {row['clients']:>3} clients {row['cache']}: "
        f"{row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} "
        f"p95 {row['ttft_p95_ms']:.0f} ms, errors {row['errors']}"
    )


def headline(rows: list[dict]) -> list[dict]:
    """Batched over one-at-a-time for each (strategy, clients, cache) both ran: throughput and p95 TTFT ratios."""
    by = {(r["scheduler"], r["strategy"], r["clients"], r["cache"]): r for r in rows}
    out = []
    for (sched, strategy, c, cache), b in by.items():
        one = by.get(("one", strategy, c, cache))
        if sched != "batch" or one is None or not one["requests_per_s"] or not one["ttft_p95_ms"]:
            continue
        out.append(
            {
                "strategy": strategy,
                "clients": c,
                "cache": cache,
                "throughput_x": round(b["requests_per_s"] / one["requests_per_s"], 2),
                "ttft_p95_ratio": round(b["ttft_p95_ms"] / one["ttft_p95_ms"], 2),
            }
        )
    return out


def table(result: dict) -> str:
    lines = [
        "| scheduler | strategy | clients | cache | req/s | tok/s | TTFT p50 ms | TTFT p95 ms"
        " | engine TTFT p50 | queue p50 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [r["scheduler"], r["strategy"], r["clients"], r["cache"], *(r[k] for k in COLUMNS)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for h in result["headline"]:
        lines.append(
            f"\nbatch vs one, {h['strategy']}, {h['clients']} clients, {h['cache']}: "
            f"throughput x{h['throughput_x']}, p95 TTFT x{h['ttft_p95_ratio']}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        series.setdefault((r["scheduler"], r["strategy"], r["cache"]), []).append(r)
    for (sched, strategy, cache), rs in sorted(series.items()):
        xs = [r["clients"] for r in rs]
        style = "-o" if cache == "warm" else "--x"
        label = f"{sched}, {strategy}, {cache}"
        left.plot(xs, [r["requests_per_s"] for r in rs], style, label=label)
        right.plot(xs, [r["ttft_p95_ms"] / 1e3 for r in rs], style, label=label)
    left.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="p95 TTFT at the client (s)", title="p95 TTFT")
    left.legend(fontsize=7)
    fig.suptitle(f"ragkv bench load ({result['data']}, {result['date']}, load avg {result['load_average'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {Path(args.plot) if args.plot else out.with_suffix('.png')}")
    return 0 if all(r["errors"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
