"""The sidecar in process (ASGI) over a tiny random model: an Engine with the hashing embedder, an app
builder and GET/POST helpers that never raise the app's exceptions (a 500 stays a 500 reply)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
from retriever_fakes import HashEmbedder, tiny_byte_adapter

from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.retriever import Retriever
from ragkv.storage import MemoryTier, TieredStore

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
B = {"Authorization": "Bearer key-b", "Content-Type": "application/json"}


class TinyEngine(Engine):
    """The real Engine over the tiny random Llama, with the hashing embedder for retrieval."""

    def retriever(self, namespace=None):
        ns = namespace or self.config.namespace
        if ns not in self._retrievers:
            cfg = replace(self.config.retriever, namespace=ns, chunk_min_tokens=40, chunk_max_tokens=80)
            path = self.config.data_path(ns)
            path.mkdir(parents=True, exist_ok=True)
            self._retrievers[ns] = Retriever.open(
                path, self.model, cfg, HashEmbedder(), self.config.catalog(ns), lead_in=self.supply.lead_in
            )
        return self._retrievers[ns]


def tiny_app(tmp, store=None, **settings):
    """The app over a TinyEngine keeping its data in `tmp` (chunk KV in `store`, else 64 MiB of RAM);
    `settings` override the server's."""
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    engine = TinyEngine(
        tiny_byte_adapter(),
        store or TieredStore([MemoryTier(1 << 26)]),
        EngineConfig(data_dir=str(tmp), max_new_tokens=2),
    )
    defaults = dict(
        api_keys=KEYS, data_dir=str(tmp), max_new_tokens=2, max_tokens_limit=4, max_document_chars=400, queue_size=8
    )
    return create_app(load_settings(**{**defaults, **settings}), engine)


def request(app, method: str, path: str, body: bytes | str | None = None, headers=A) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await c.request(method, path, content=body, headers=headers)

    return asyncio.run(go())


def post(app, path: str, body: bytes | str, headers=A) -> httpx.Response:
    return request(app, "POST", path, body, headers)


def get(app, path: str, headers=A) -> httpx.Response:
    return request(app, "GET", path, None, headers)
