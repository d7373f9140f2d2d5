"""The clients of `bench_load.py`: requests drawn from a data set (a question with its passages), sent
by N concurrent asyncio clients (httpx, one event loop: the bench itself stays light on CPU) as
streamed chat completions, each timed at the client: time to the first text piece (TTFT as the user
sees it), to the end, and the server's own accounting (engine TTFT, queue time, completion tokens)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from loadtest import percentile

from ragkv.cli.demo import shipped_demo
from ragkv.eval.datasets import load_samples


@dataclass(frozen=True)
class Sample:
    question: str
    passages: tuple[str, ...]


def demo_samples(passages: int = 3) -> list[Sample]:
    """The demo's questions, each over its own passage and the next `passages - 1` demo passages."""
    paths, records = shipped_demo()
    by_id = {Path(p).stem: Path(p).read_text().strip() for p in paths}
    texts = [by_id[r["id"]] for r in records]
    return [
        Sample(r["question"], tuple(texts[(i + j) % len(texts)] for j in range(passages)))
        for i, r in enumerate(records)
    ]


def dataset_samples(path: Path, passages: int = 3, limit: int | None = None) -> list[Sample]:
    """A CacheBlend MuSiQue/2WikiMQA JSON file's questions with their first `passages` passages."""
    return [Sample(s.question, s.chunks) for s in load_samples(path, "musique", limit=limit, max_chunks=passages)]


async def one_request(http: httpx.AsyncClient, body: dict, clock: float | None = None) -> dict:
    """One streamed chat completion, timed at the client; `ok` False with the status on an error.
    `clock`: the pass's start (perf_counter), for the request's timeline (sent, first piece, end)."""
    t0 = time.perf_counter()
    clock = t0 if clock is None else clock
    first, final = None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"ok": False, "status": obj["error"].get("message", "error")[:200]}
            if first is None and obj["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter()
            if "ragkv" in obj:
                final = obj
    end = time.perf_counter()
    if final is None:
        return {"ok": False, "status": "no final chunk"}
    return {
        "ok": True,
        "latency_ms": (end - t0) * 1e3,
        "ttft_ms": ((first or end) - t0) * 1e3,  # as the client sees it: queue + fusion + first step
        "engine_ttft_ms": final["ragkv"]["ttft_ms"],
        "queue_ms": final["ragkv"]["queue_ms"],
        "tokens": final["usage"]["completion_tokens"],
        "misses": final["ragkv"]["misses"],
        "sent_s": round(t0 - clock, 3),
        "first_s": round((first or end) - clock, 3),
        "end_s": round(end - clock, 3),
        "parts_ms": {k: round(v, 1) for k, v in final["ragkv"].get("parts_ms", {}).items() if v},
    }


def chat_body(sample: Sample, strategy: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": sample.question}],
        "documents": list(sample.passages),
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "blend": {"strategy": strategy},
    }


async def run_pass(
    url: str, samples: list[Sample], clients: int, strategy: str, max_tokens: int, timeline: bool = False
) -> dict:
    """`clients` concurrent clients, client c sending samples c, c + clients, ... one after another.
    `timeline`: the summary also lists every request (client, sent, first piece, end, TTFT parts)."""
    results: list[dict] = []

    async def client(http: httpx.AsyncClient, c: int, mine: list[Sample]) -> None:
        for i, s in enumerate(mine):
            try:
                result = await one_request(http, chat_body(s, strategy, max_tokens), t0)
            except httpx.HTTPError as err:
                result = {"ok": False, "status": type(err).__name__}
            results.append({"client": c, "request": i, **result})

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, c, samples[c::clients]) for c in range(clients)))
        wall = time.perf_counter() - t0
    summary = summarize(results, wall)
    if timeline:
        summary["timeline"] = sorted(results, key=lambda r: (r.get("sent_s", 0.0), r["client"]))
    return summary


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]

    def pct(name: str, p: float) -> float:
        return round(percentile([r[name] for r in ok], p), 1)

    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": [r["status"] for r in results if not r["ok"]][:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall else 0.0,
        "ttft_p50_ms": pct("ttft_ms", 50),
        "ttft_p95_ms": pct("ttft_ms", 95),
        "latency_p50_ms": pct("latency_ms", 50),
        "latency_p95_ms": pct("latency_ms", 95),
        "engine_ttft_p50_ms": pct("engine_ttft_ms", 50),
        "queue_p50_ms": pct("queue_ms", 50),
        "misses": sum(r["misses"] for r in ok),
    }
