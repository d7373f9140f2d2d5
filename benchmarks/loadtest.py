"""Load test of a running sidecar: C concurrent clients x N chat requests each over a few short shared
documents (so chunk caches are reused, as in RAG traffic); prints a latency table and writes JSON.

    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --clients 16 --requests 20 --out serving.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import httpx

DOCS = [
    ["The Rhine bends north at Basel.", "Lake Constance feeds the Rhine."],
    ["Ada Lovelace wrote the first program.", "Babbage designed the Analytical Engine."],
    ["Venus spins backwards.", "A day on Venus outlasts its year."],
    ["Plants turn light into sugar.", "Chlorophyll absorbs red and blue light."],
]
QUESTIONS = [
    "Where does the Rhine bend?",
    "Who wrote the first program?",
    "How does Venus spin?",
    "What do plants make?",
]


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation."""
    s = sorted(xs)
    if not s:
        return float("nan")
    i = (len(s) - 1) * p / 100
    lo, hi = int(i), min(int(i) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def run_load(
    url: str,
    clients: int = 16,
    requests: int = 20,
    max_tokens: int = 2,
    api_key: str | None = None,
    stream: bool = False,
    timeout: float = 600.0,
) -> dict:
    """Fire clients x requests chat completions; latencies (ms), TTFT, errors and throughput."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    lat: list[float] = []
    ttft: list[float] = []
    chunks = {"hits": 0, "misses": 0}  # chunk KV reads the answers report (`ragkv.hits`, `ragkv.misses`)
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
            for i in range(requests):
                n = (c + i) % len(DOCS)
                body = {
                    "messages": [{"role": "user", "content": QUESTIONS[n]}],
                    "documents": DOCS[n],
                    "max_tokens": max_tokens,
                    "stream": stream,
                }
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    ms = (time.perf_counter() - t0) * 1e3
                    ok = r.status_code == 200
                    info = (
                        (json.loads(r.text.split("data: ")[-2]) if stream else r.json()).get("ragkv", {}) if ok else {}
                    )
                except httpx.HTTPError as err:
                    ok, ms, info, r = False, 0.0, {}, err
                with lock:
                    if ok:
                        lat.append(ms)
                        ttft.append(info.get("ttft_ms", float("nan")))
                        chunks["hits"] += sum(info.get("hits", {}).values())
                        chunks["misses"] += info.get("misses", 0)
                    else:
                        errors.append(str(getattr(r, "status_code", r)))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    summary = {
        name: {
            "p50": percentile(xs, 50),
            "p90": percentile(xs, 90),
            "p95": percentile(xs, 95),
            "p99": percentile(xs, 99),
            "max": max(xs, default=float("nan")),
            "mean": statistics.fmean(xs) if xs else float("nan"),
        }
        for name, xs in (("latency_ms", lat), ("engine_ttft_ms", ttft))
    }
    return {
        "url": url,
        "clients": clients,
        "requests_per_client": requests,
        "max_tokens": max_tokens,
        "stream": stream,
        "ok": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": wall,
        "throughput_rps": len(lat) / wall if wall else 0.0,
        "chunk_hits": chunks["hits"],
        "chunk_misses": chunks["misses"],
        **summary,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def table(result: dict) -> str:
    """The percentiles as a markdown table."""
    lines = ["| metric | p50 | p90 | p95 | p99 | max | mean |", "|---|---|---|---|---|---|---|"]
    for name in ("latency_ms", "engine_ttft_ms"):
        r = result[name]
        lines.append(
            f"| {name} | " + " | ".join(f"{r[k]:.0f}" for k in ("p50", "p90", "p95", "p99", "max", "mean")) + " |"
        )
    lines.append(
        f"\n{result['clients']} clients x {result['requests_per_client']} requests: {result['ok']} ok, "
        f"{result['errors']} errors, {result['wall_s']:.1f} s, {result['throughput_rps']:.2f} req/s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--api-key", default=None)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--out", default="serving.json")
    args = p.parse_args(argv)
    result = run_load(args.url, args.clients, args.requests, args.max_tokens, args.api_key, args.stream)
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
