"""The sidecar makes an empty retrieval visible (`ragkv.warnings`, a Prometheus counter), reports the
queue capacity `--queue-size` set, and its cache stats count the misses its answers report. A stub
engine stands in for the model."""

from __future__ import annotations

import asyncio

import httpx

from ragkv.engine.answer import Answer
from ragkv.engine.config import EngineConfig
from ragkv.engine.request import FusionRequest
from ragkv.storage.services import StoreServices


class StubEngine:
    def __init__(self) -> None:
        self.store = type("S", (), {"flush": lambda self: None, "services": StoreServices([])})()  # no tiers

    def tokenize_chunks(self, docs):
        return [[1, 2] for _ in docs]

    def request(self, question, documents=None, **options):
        return FusionRequest.build(EngineConfig(), question, documents, **options)

    def answer_events(self, request):
        self.chunks = [list(c) for c in request.chunks]
        yield "ok"
        yield Answer(
            text="ok",
            token_ids=[5],
            strategy="cacheblend",
            recompute_ratio=0.15,
            ttft_ms=1.0,
            parts_ms={},
            recompute_fraction=0.0,
            prompt_tokens=3,
        )


def _app(tmp_path, **settings):
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    app = create_app(load_settings(data_dir=str(tmp_path), **settings), StubEngine())
    app.state.documents.search = lambda namespace, query, k: []  # an empty corpus
    return app


def _run(app, steps):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await steps(c)

    try:
        asyncio.run(main())
    finally:
        app.state.worker.close()


def test_empty_retrieval_is_a_warning_and_a_counter(tmp_path):
    app = _app(tmp_path)

    async def steps(c):
        body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 1, "retrieve": {"k": 2}}
        r = (await c.post("/v1/chat/completions", json=body)).json()
        assert r["ragkv"]["retrieved"] == [] and "retrieval found no chunks" in r["ragkv"]["warnings"][0]
        with_doc = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 1, "documents": ["some text"]}
        assert (await c.post("/v1/chat/completions", json=with_doc)).json()["ragkv"]["warnings"] == []
        r = (await c.post("/v1/retrieve", json={"query": "q", "k": 2})).json()
        assert r["chunks"] == [] and "namespace 'default' has no ingested documents" in r["warnings"][0]
        assert "ragkv_empty_retrievals_total 2.0" in (await c.get("/metrics")).text

    _run(app, steps)


def test_healthz_reports_the_queue_size_it_was_given(tmp_path):
    for size in (64, 5):
        app = _app(tmp_path, queue_size=size)

        async def steps(c, size=size):
            assert (await c.get("/healthz")).json()["queue_capacity"] == size

        _run(app, steps)


def test_cache_stats_count_the_misses_an_answer_reports(smollm2, tmp_path):
    from ragkv.engine.config import EngineConfig
    from ragkv.engine.engine import Engine
    from ragkv.storage import MemoryTier, TieredStore

    engine = Engine(smollm2, TieredStore([MemoryTier(1 << 30)]), EngineConfig(data_dir=str(tmp_path)))
    answer = engine.generate("Which river?", ["The Danube flows east.", "The Elbe flows north."], max_new_tokens=1)
    assert answer.misses == 2 and engine.store.stats().misses == 2
    again = engine.generate("Which river?", ["The Danube flows east.", "The Elbe flows north."], max_new_tokens=1)
    assert again.misses == 0 and engine.store.stats().misses == 2
    engine.close()
