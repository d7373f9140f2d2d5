"""Fairness between tenants on the one model worker, over loopback HTTP (uvicorn on 127.0.0.1).

Tenant A floods `/v1/documents` with long documents from several clients while tenant B sends short
chats one after another; B's latency is compared with B alone. The engine is a stand-in whose work
is sleeps (a document = `--doc-steps` steps of `--step-ms`; a chat = prefill + 2 tokens of `--chat-ms`
each), so the numbers measure the scheduling, not the model, and do not depend on the shared CPU.
`--atomic` makes each ingestion one indivisible step (how the worker ran before: FIFO, one job at a
time), for comparison.

    python benchmarks/bench_fairness.py --chats 30 --flooders 4 --out fairness.json
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ragkv.engine.answer import Answer
from ragkv.engine.config import EngineConfig
from ragkv.engine.request import FusionRequest

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


class SleepEngine:
    """Engine surface the completions path uses; generation sleeps `chat_ms` per step."""

    def __init__(self, chat_ms: float) -> None:
        self.chat_s = chat_ms / 1e3
        self.store = type("S", (), {"flush": lambda self: None, "tiers": []})()

    def tokenize_chunks(self, docs):
        return [[1, 2, 3] for _ in docs]

    def request(self, question, documents=None, **options):
        return FusionRequest.build(EngineConfig(), question, documents, **options)

    def answer_events(self, request):
        time.sleep(self.chat_s)  # prefill
        for piece in ("o", "k"):
            time.sleep(self.chat_s)
            yield piece
        yield Answer("ok", [5, 6], "cacheblend", 0.15, self.chat_s * 3e3, {}, 0.2, 3)


class SleepDocuments:
    """DocumentService stand-in: ingesting a document takes `steps` steps of `step_ms` (or one big step)."""

    def __init__(self, steps: int, step_ms: float, atomic: bool) -> None:
        self.steps, self.step_s, self.atomic = steps, step_ms / 1e3, atomic

    def ingest_steps(self, namespace, documents):
        if self.atomic:
            time.sleep(self.steps * self.step_s * len(documents))
        else:
            for _ in range(self.steps * len(documents)):
                time.sleep(self.step_s)
                yield None
        yield {"documents": len(documents), "added": len(documents)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args):
    """Start the app on loopback in a thread; (base URL, uvicorn server)."""
    import uvicorn

    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    scratch = tempfile.TemporaryDirectory(prefix="ragkv-fairness-")
    settings = load_settings(api_keys=KEYS, queue_size=64, data_dir=scratch.name)
    app = create_app(settings, SleepEngine(args.chat_ms))
    app.state.scratch = scratch  # lives as long as the app; removed when the process exits
    app.state.documents = SleepDocuments(args.doc_steps, args.step_ms, args.atomic)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return url, server
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


def chats(url: str, n: int) -> list[float]:
    """Latencies (ms) of `n` sequential short chats of tenant B."""
    out = []
    body = {"messages": [{"role": "user", "content": "q"}], "documents": ["short"], "max_tokens": 2}
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer key-b"}) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def flood(url: str, stop: threading.Event, done: list[int]) -> None:
    """Tenant A: long documents back to back until `stop`."""
    body = {"documents": [{"id": "long", "text": "lorem ipsum " * 3000}]}
    with httpx.Client(timeout=300, headers={"Authorization": "Bearer key-a"}) as c:
        while not stop.is_set():
            r = c.post(f"{url}/v1/documents", json=body)
            r.raise_for_status()
            done.append(1)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chats", type=int, default=30)
    ap.add_argument("--flooders", type=int, default=4)
    ap.add_argument("--doc-steps", type=int, default=40)
    ap.add_argument("--step-ms", type=float, default=25.0)
    ap.add_argument("--chat-ms", type=float, default=10.0)
    ap.add_argument("--atomic", action="store_true", help="one step per ingestion (the old FIFO behaviour)")
    ap.add_argument("--out", default="fairness.json")
    args = ap.parse_args()
    url, server = serve(args)
    solo = chats(url, args.chats)
    stop, done = threading.Event(), []
    threads = [threading.Thread(target=flood, args=(url, stop, done)) for _ in range(args.flooders)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the flood is queued
    loaded = chats(url, args.chats)
    stop.set()
    for t in threads:
        t.join()
    server.should_exit = True
    result = {
        "mode": "atomic ingestion (before)" if args.atomic else "stepped ingestion, fair share across tenants",
        "chats": args.chats,
        "flooders": args.flooders,
        "document_work_ms": args.doc_steps * args.step_ms,
        "documents_ingested_during": len(done),
        "solo_p50_ms": round(sorted(solo)[len(solo) // 2], 1),
        "solo_p95_ms": round(p95(solo), 1),
        "flooded_p50_ms": round(sorted(loaded)[len(loaded) // 2], 1),
        "flooded_p95_ms": round(p95(loaded), 1),
    }
    result["p95_ratio"] = round(result["flooded_p95_ms"] / result["solo_p95_ms"], 2)
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
