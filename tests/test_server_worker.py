"""The model queue without a model: admission limit (429 + Retry-After through the app), results and
errors handed back, streaming, and `close()` waiting for admitted work. A stub engine stands in."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from ragkv.engine.answer import Answer
from ragkv.engine.config import EngineConfig
from ragkv.engine.request import FusionRequest
from ragkv.server.worker import ModelWorker, QueueFull, ShuttingDown
from ragkv.storage.services import StoreServices


def test_call_stream_and_errors():
    async def main():
        w = ModelWorker(queue_size=2)
        assert await w.call(lambda x: x * 2, 21) == 42
        assert [i async for i in w.stream(lambda: iter("abc"))] == ["a", "b", "c"]
        with pytest.raises(ZeroDivisionError):
            await w.call(lambda: 1 / 0)
        assert w.depth == 0
        w.close()
        with pytest.raises(ShuttingDown):
            await w.call(lambda: 1)

    asyncio.run(main())


def test_queue_full_and_close_waits():
    gate = threading.Event()

    async def main():
        w = ModelWorker(queue_size=1)  # one running + one waiting
        a = asyncio.ensure_future(w.call(gate.wait, 10))
        b = asyncio.ensure_future(w.call(lambda: "b"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await w.call(lambda: "c")
        gate.set()
        assert await a is True and await b == "b"
        w.close()

    asyncio.run(main())


class StubEngine:
    """generate() blocks until `gate` opens, then yields one piece and an Answer."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.store = type("S", (), {"flush": lambda self: None, "stats": None, "services": StoreServices([])})()

    def tokenize_chunks(self, docs):
        return [[1, 2] for _ in docs]

    def request(self, question, documents=None, **options):
        return FusionRequest.build(EngineConfig(), question, documents, **options)

    def answer_events(self, request):
        self.gate.wait(10)
        yield "ok"
        yield Answer(
            text="ok",
            token_ids=[5],
            strategy="cacheblend",
            recompute_ratio=0.15,
            ttft_ms=1.0,
            parts_ms={},
            recompute_fraction=0.2,
            prompt_tokens=3,
        )


def test_app_answers_429_with_retry_after_when_the_queue_is_full(tmp_path):
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    engine = StubEngine()
    app = create_app(load_settings(queue_size=1, retry_after_s=3, data_dir=str(tmp_path)), engine)
    body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 1}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = [asyncio.ensure_future(c.post("/v1/chat/completions", json=body)) for _ in range(2)]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            health = await c.get("/healthz")
            assert health.status_code == 200 and health.json()["queue_depth"] == 2 and time.perf_counter() - t0 < 1
            full = await c.post("/v1/chat/completions", json=body)
            assert full.status_code == 429 and full.headers["retry-after"] == "3"
            assert "queue is full" in full.json()["error"]["message"]
            engine.gate.set()
            assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
            assert "ragkv_rejected_total 1.0" in (await c.get("/metrics")).text

    asyncio.run(main())
    app.state.worker.close()
