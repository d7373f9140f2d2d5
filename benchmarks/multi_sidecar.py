"""Several `ragkv serve` sidecars sharing one Redis: cross-instance hit rate against one sidecar on the
same request stream, duplicate precomputes, client errors while Redis is killed and restarted, and
(in process) TTFT of a cachegen Redis tier against a local disk tier. Loopback only, bounded.

    python benchmarks/multi_sidecar.py --sidecars 3 --clients 12 --requests 20 --out docs/bench/multi_sidecar.json

The request stream comes from the RAGPulse trace (`shared_data("ragpulse")`, read at run time):
by default each request draws --passages distinct passages among the trace's --corpus most
referenced ones, weighted by how often the whole trace references each (its real popularity, steady
state); `--mode replay` takes the trace's first clients x requests requests in time order instead (a
cold start: little reuse in a short prefix). The trace has no text: each passage id becomes a
reproducible made-up paragraph of --words words. Client c talks to sidecar c % sidecars.

Phase 1: one sidecar, RAM tier only. Phase 2: N sidecars, RAM tier + the shared Redis tier
(cachegen); Redis (appendonly, so a restart keeps what was committed) is killed after --kill-at of
the requests and restarted --down-s seconds later. Hits count chunks served from any tier or computed
meanwhile by another sidecar; duplicates are precomputes of a chunk some sidecar had already computed
(the Redis counter each sidecar reports). Phase 3 (in process): TTFT of SmolLM2 over 4 cached passages
read from a cachegen Redis tier vs local disk tiers. Needs redis-server on PATH (`.ci/redis.sh`
installs it) and the converted SmolLM2 (~/.cache/ragkv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sidecar_procs import RedisServer, start_sidecar, stop  # benchmarks/ is on sys.path

from ragkv.eval.shared_data import shared_data

RAGPULSE = shared_data("ragpulse")
WORDS = (
    "river stone cloud lamp orbit maple quartz tide harbor lantern meadow copper falcon glacier willow ember "
    "canyon prairie summit beacon delta thistle cobalt saffron juniper basalt marble pepper violet amber cedar "
    "signal archive ledger policy tuition campus library dormitory semester credit faculty thesis"
).split()


# -- the request stream --------------------------------------------------------------------------------
def load_stream(n: int, max_passages: int) -> list[list[int]]:
    """Passage ids of the first `n` RAGPulse requests with passages, in time order."""
    rows = []
    with open(RAGPULSE / "0_trace.jsonl") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ids = r["hash_ids"].get("passages_ids") or []
                if ids:
                    rows.append((float(r["timestamp"]), ids[:max_passages]))
    rows.sort(key=lambda x: x[0])
    return [ids for _, ids in rows[:n]]


def popularity_stream(n: int, per_request: int, corpus: int, seed: int = 0) -> list[list[int]]:
    """`n` requests of `per_request` distinct passages each from the trace's `corpus` most referenced
    passages, each drawn with weight = how often the whole trace references it."""
    import random
    from collections import Counter

    counts = Counter(p for ids in load_stream(10**9, 10**9) for p in ids)
    top = counts.most_common(corpus)
    ids, weights = [p for p, _ in top], [c for _, c in top]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picked: list[int] = []
        while len(picked) < per_request:
            p = rng.choices(ids, weights)[0]
            if p not in picked:
                picked.append(p)
        out.append(picked)
    return out


def passage_text(pid: int, words: int) -> str:
    """A reproducible paragraph standing for passage `pid` (the trace has ids, not text)."""
    import random

    rng = random.Random(pid)
    return f"Passage {pid}. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


# -- processes ------------------------------------------------------------------------------------------
# -- one run ------------------------------------------------------------------------------------------------
def replay(
    urls: list[str], stream: list[list[int]], clients: int, words: int, on_progress=None, events: dict | None = None
) -> dict:
    """Client c sends requests c, c + clients, ... of `stream` to urls[c % len(urls)], one at a time."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]

    def client(c: int) -> None:
        url = urls[c % len(urls)]
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(c, len(stream), clients):
                docs = [passage_text(p, words) for p in stream[i]]
                body = {
                    "messages": [{"role": "user", "content": f"What does request {i} ask about?"}],
                    "max_tokens": 1,
                    "documents": docs,
                }
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                    row = r.json()["ragkv"] if ok else None
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    ok, row, r = False, None, err
                with lock:
                    done[0] += 1
                    if ok:
                        now = time.perf_counter()
                        results.append({**row, "latency_ms": (now - t0) * 1e3, "sidecar": url, "finished": now})
                    else:
                        errors.append(f"{getattr(r, 'status_code', '')} {str(getattr(r, 'text', r))[:200]}")
                if on_progress:
                    on_progress(done[0])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hits = sum(sum(r["hits"].values()) for r in results)
    misses = sum(r["misses"] for r in results)
    if events is not None and "restarted_at" in events:  # requests that finished after Redis came back
        after = [r for r in results if r["finished"] > events["restarted_at"]]
        h = sum(sum(r["hits"].values()) for r in after)
        m = sum(r["misses"] for r in after)
        events["after_restart"] = {
            "answered": len(after),
            "hit_rate": h / max(1, h + m),
            "hits_by_tier": _sum_dicts(r["hits"] for r in after),
        }
    return {
        "requests": len(stream),
        "answered": len(results),
        "errors": len(errors),
        "error_samples": errors[:5],
        "hit_rate": hits / max(1, hits + misses),
        "hits": hits,
        "misses": misses,
        "hits_by_tier": _sum_dicts(r["hits"] for r in results),
        "degraded_answers": sum(bool(r.get("warnings")) for r in results),
        "ttft_ms_median": statistics.median([r["ttft_ms"] for r in results]) if results else None,
        "wall_s": time.perf_counter() - t0,
    }


def _sum_dicts(ds) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def remote_stats(urls: list[str]) -> dict:
    """Sum of the sidecars' compute-lease counters from /metrics (`ragkv_compute_leases{outcome=...}`:
    computed, arrived, timeouts, duplicates, unleased, outage_duplicates)."""
    total: dict = {}
    errors = []
    for url in urls:
        r = httpx.get(f"{url}/metrics", timeout=30)
        if r.status_code != 200:
            errors.append(f"{r.status_code} {r.text[:200]}")
            continue
        leases = {}
        for line in r.text.splitlines():
            if line.startswith('ragkv_compute_leases{outcome="'):
                name, value = line.split('"')[1], line.rsplit(" ", 1)[1]
                leases[name] = int(float(value))
        total = _sum_dicts([total, leases])
    return {**total, "stats_errors": errors} if errors else total


# -- TTFT: Redis tier vs disk tier, in process ------------------------------------------------------------
def ttft_remote_vs_disk(redis_url: str, workdir: Path, reps: int, words: int) -> dict:
    """Median TTFT of SmolLM2 over 4 cached passages read from a cachegen Redis tier vs local disk tiers."""
    sys.path.insert(0, str(workdir / "py"))
    from ragkv.engine import Engine, EngineConfig
    from ragkv.models import load_adapter
    from ragkv.storage import StorageConfig, TierConfig, build_store

    model = load_adapter("smollm2")
    docs = [passage_text(900_000 + i, words) for i in range(4)]
    stores = {
        "redis/cachegen": StorageConfig(
            tiers=(TierConfig("redis", 1 << 30, "cachegen", url=redis_url, prefix="ttft"),)
        ),
        "disk/cachegen": StorageConfig(tiers=(TierConfig("disk", 1 << 30, "cachegen"),), disk_dir=str(workdir / "d1")),
        "disk/lz4": StorageConfig(tiers=(TierConfig("disk", 1 << 30, "lz4"),), disk_dir=str(workdir / "d2")),
    }
    engines = {k: Engine(model, build_store(c), EngineConfig(max_new_tokens=1)) for k, c in stores.items()}
    times: dict[str, list[float]] = {k: [] for k in engines}
    cache_ms: dict[str, list[float]] = {k: [] for k in engines}  # the `load` part: read + per-layer decode
    read_ms: dict[str, list[float]] = {k: [] for k in engines}  # read + decode all layers, no model
    keys = None
    for e in engines.values():
        e.generate("What is this about?", docs, max_new_tokens=1)  # stores the chunks, warms up
        keys = e.ensure_cached(e.tokenize_chunks(docs))[0]
    for _ in range(reps):  # interleaved, so machine noise hits every variant alike
        for k, e in engines.items():
            a = e.generate("What is this about?", docs, max_new_tokens=1)
            assert a.misses == 0, f"{k}: expected all hits, got {a.hits} / {a.misses} misses"
            times[k].append(a.ttft_ms)
            cache_ms[k].append(a.parts_ms["load"])
            t0 = time.perf_counter()
            for kv in e.store.get_layered_many(keys):
                for layer in range(kv.num_layers):
                    kv.layer(layer)
            read_ms[k].append((time.perf_counter() - t0) * 1e3)
    for e in engines.values():
        e.store.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    read = {k: statistics.median(v) for k, v in read_ms.items()}
    return {
        "ttft_ms_median": med,
        "load_ms_median": {k: statistics.median(v) for k, v in cache_ms.items()},
        "read_decode_ms_median": read,
        "ratio_read_redis_vs_disk_cachegen": read["redis/cachegen"] / read["disk/cachegen"],
        "ttft_ms_all": times,
        "read_decode_ms_all": read_ms,
        "ratio_redis_vs_disk_cachegen": med["redis/cachegen"] / med["disk/cachegen"],
        "ratio_redis_vs_disk_lz4": med["redis/cachegen"] / med["disk/lz4"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sidecars", type=int, default=3)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--passages", type=int, default=4, help="at most this many passages per request")
    p.add_argument("--corpus", type=int, default=200, help="popularity mode: the trace's N most referenced passages")
    p.add_argument(
        "--mode",
        choices=("popularity", "replay"),
        default="popularity",
        help="draw passages by the trace's popularity, or replay its first requests in time order (cold start)",
    )
    p.add_argument("--words", type=int, default=40, help="words per made-up passage")
    p.add_argument("--kill-at", type=float, default=0.4, help="fraction of requests after which Redis is killed")
    p.add_argument("--down-s", type=float, default=3.0, help="seconds Redis stays down")
    p.add_argument("--ttft-reps", type=int, default=10)
    p.add_argument("--skip-single", action="store_true", help="skip the one-sidecar baseline")
    p.add_argument("--only-single", action="store_true", help="only the one-sidecar baseline (no Redis phases)")
    p.add_argument("--only-ttft", action="store_true", help="only the in-process TTFT comparison")
    p.add_argument("--out", default="multi_sidecar.json")
    args = p.parse_args(argv)
    if not 1 <= args.sidecars <= 8 or not 1 <= args.clients <= 64 or not 1 <= args.requests <= 100:
        p.error("bounded: 1-8 sidecars, 1-64 clients, 1-100 requests per client")
    if shutil.which("redis-server") is None:
        p.error("redis-server is not on PATH: run .ci/redis.sh (or apt-get install redis-server)")
    n = args.clients * args.requests
    stream = (
        popularity_stream(n, args.passages, args.corpus) if args.mode == "popularity" else load_stream(n, args.passages)
    )
    work = Path(tempfile.mkdtemp(prefix="ragkv-multi-"))
    logs = work / "logs"
    logs.mkdir()
    redis = RedisServer(work)
    redis.start()
    out: dict = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared)",
        "args": vars(args),
        "distinct_passages": len({p for r in stream for p in r}),
        "passage_refs": sum(len(r) for r in stream),
    }
    procs: list[subprocess.Popen] = []
    if args.only_ttft:
        try:
            out["ttft"] = ttft_remote_vs_disk(redis.url, work, args.ttft_reps, args.words)
        finally:
            redis.kill()
        Path(args.out).write_text(json.dumps(out, indent=2))
        t = out["ttft"]
        for name in ("ttft_ms_median", "load_ms_median", "read_decode_ms_median"):
            print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in t[name].items()))
        print(
            f"redis/cachegen over disk/cachegen: TTFT {t['ratio_redis_vs_disk_cachegen']:.3f}x, "
            f"read+decode {t['ratio_read_redis_vs_disk_cachegen']:.3f}x"
        )
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.only_single:
        try:
            url, proc = start_sidecar(work, "single", None, logs)
            out["single"] = replay([url], stream, args.clients, args.words)
            stop(proc)
        finally:
            redis.kill()
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"single sidecar: {json.dumps(out['single'])}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    try:
        if not args.skip_single:
            url, proc = start_sidecar(work, "single", None, logs)
            out["single"] = replay([url], stream, args.clients, args.words)
            stop(proc)
            print(f"single sidecar: {json.dumps(out['single'])}", flush=True)
        urls = []
        for i in range(args.sidecars):
            url, proc = start_sidecar(work, f"s{i}", redis.url, logs)
            urls.append(url)
            procs.append(proc)
        kill_after = int(args.kill_at * len(stream))
        events: dict = {}

        def progress(n: int) -> None:
            if n == kill_after and "killed_at" not in events:
                events["killed_at"] = n
                redis.kill()

                def restart() -> None:
                    time.sleep(args.down_s)
                    redis.start()
                    events["restarted_at"] = time.perf_counter()

                threading.Thread(target=restart, daemon=True).start()

        out["multi"] = replay(urls, stream, args.clients, args.words, progress if args.kill_at > 0 else None, events)
        out["multi"]["redis_killed_after_requests"] = events.get("killed_at")
        out["multi"]["after_restart"] = events.get("after_restart")
        out["multi"]["leases"] = remote_stats(urls)
        print(f"{args.sidecars} sidecars: {json.dumps(out['multi'])}", flush=True)
        if "single" in out:
            out["hit_rate_ratio_multi_vs_single"] = out["multi"]["hit_rate"] / max(1e-9, out["single"]["hit_rate"])
        for proc in procs:
            stop(proc)
        procs = []
        out["multi"]["duplicate_log"] = [  # each counted duplicate, as the sidecars logged it
            line.strip() for f in sorted(logs.glob("sidecar-s*.log")) for line in open(f) if "precomputed again" in line
        ]
        if args.ttft_reps:
            out["ttft"] = ttft_remote_vs_disk(redis.url, work, args.ttft_reps, args.words)
            print(f"ttft: {json.dumps(out['ttft']['ttft_ms_median'])}", flush=True)
    finally:
        for proc in procs:
            stop(proc)
        redis.kill()
    Path(args.out).write_text(json.dumps(out, indent=2))
    s, m = out.get("single", {}), out["multi"]
    print(f"\n{'run':<14}{'hit rate':>10}{'errors':>8}{'TTFT ms':>10}{'wall s':>8}")
    for name, r in (("1 sidecar", s), (f"{args.sidecars} sidecars", m)):
        if r:
            print(f"{name:<14}{r['hit_rate']:>10.3f}{r['errors']:>8}{r['ttft_ms_median']:>10.1f}{r['wall_s']:>8.1f}")
    print(f"leases: {m['leases']}")
    if "ttft" in out:
        print(f"TTFT medians: {out['ttft']['ttft_ms_median']}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
