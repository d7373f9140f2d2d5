"""The FastAPI sidecar: `create_app(settings, engine)` wires the OpenAI-compatible endpoints, the
document / retrieval / cache endpoints, health, Prometheus metrics, API-key tenants, request size
limits and the bounded model queue. `ragkv serve` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..engine.documents import DocumentService
from . import errors
from .auth import tenant
from .completions import router as completions_router
from .disconnect import cancel_on_disconnect
from .errors import ApiError, error_response
from .metrics import Metrics
from .schemas import DocumentsRequest, RetrieveRequest
from .settings import ServerSettings
from .tenant_stats import TenantCounters, tenant_store_stats
from .worker import ModelWorker


def create_app(settings: ServerSettings, engine=None) -> FastAPI:
    """The app over `engine` (loaded from `settings` when None)."""
    if engine is None:
        from ..engine.engine import Engine

        engine = Engine.from_pretrained(config=settings.engine_config())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has stopped accepting and waited for open requests; finish what the worker holds
        await asyncio.to_thread(app.state.worker.close, True)
        getattr(engine, "close", engine.store.flush)()  # saves indexes, flushes the store

    app = FastAPI(
        title="ragkv",
        version="0.1.0",
        lifespan=lifespan,
        description="RAG KV-cache reuse sidecar: OpenAI-compatible completions over cached chunk KV.",
    )
    init = None
    if settings.torch_threads:
        import torch

        init = lambda: torch.set_num_threads(settings.torch_threads)  # noqa: E731
    app.state.settings = settings
    app.state.engine = engine
    app.state.worker = ModelWorker(settings.queue_size, init=init, per_tenant=settings.max_inflight_per_tenant)
    app.state.metrics = Metrics()
    app.state.tenant_counters = TenantCounters()
    app.state.documents = DocumentService(engine)
    errors.install(app, settings.retry_after_s)
    app.add_middleware(_Observe)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(completions_router)
    app.include_router(_router())
    return app


def _router():
    from fastapi import APIRouter

    r = APIRouter()

    @r.get("/healthz")
    async def healthz(request: Request):
        s = request.app.state
        return {
            "status": "ok",
            "model": s.settings.model,
            "queue_depth": s.worker.depth,
            "queue_capacity": s.worker.capacity,
            "auth": s.settings.auth_enabled,
        }

    @r.get("/metrics")
    async def metrics(request: Request):
        s = request.app.state
        s.metrics.queue_depth.set(s.worker.depth)
        return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @r.get("/v1/cache/stats")
    async def cache_stats(request: Request, namespace: str = Depends(tenant)):
        s = request.app.state
        stats = await asyncio.to_thread(tenant_store_stats, s.engine.store, namespace, s.tenant_counters)
        return {"namespace": namespace, "store": stats, "queue_depth": s.worker.in_flight(namespace)}

    @r.post("/v1/documents")
    async def add_documents(body: DocumentsRequest, request: Request, namespace: str = Depends(tenant)):
        s = request.app.state
        if len(body.documents) > s.settings.max_documents:
            raise ApiError(
                400,
                f"too many documents: {len(body.documents)}; the limit per request is {s.settings.max_documents}",
                "documents",
            )
        docs = [d.model_dump() for d in body.documents]

        async def ingest() -> dict:
            report = None  # one step per document / KV batch; other tenants' requests run in between
            async for item in s.worker.steps(lambda: s.documents.ingest_steps(namespace, docs), namespace):
                report = item
            return report

        report = await cancel_on_disconnect(request, ingest())
        return {"namespace": namespace, **report}

    @r.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str, request: Request, namespace: str = Depends(tenant)):
        s = request.app.state
        doc = await s.worker.call(s.documents.get, namespace, doc_id, tenant=namespace)
        if doc is None:
            raise ApiError(404, f"no document {doc_id!r} in this namespace", "doc_id")
        return doc

    @r.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str, request: Request, namespace: str = Depends(tenant)):
        s = request.app.state
        dropped = await s.worker.call(s.documents.delete, namespace, doc_id, tenant=namespace)
        if dropped is None:
            raise ApiError(404, f"no document {doc_id!r} in this namespace", "doc_id")
        return {"id": doc_id, "deleted": True, "invalidated_keys": dropped}

    @r.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest, request: Request, namespace: str = Depends(tenant)):
        s = request.app.state
        if body.k > s.settings.max_retrieve_k:
            raise ApiError(400, f"k {body.k} is over the limit of {s.settings.max_retrieve_k}", "k")
        search = s.worker.call(s.documents.search, namespace, body.query, body.k, tenant=namespace)
        hits = await cancel_on_disconnect(request, search)
        return {
            "namespace": namespace,
            "chunks": [
                {
                    "chunk_id": h.chunk_id,
                    "doc_id": h.doc_id,
                    "score": h.score,
                    "text": h.text,
                    "key": str(h.key),
                    "position": h.position,
                    "num_tokens": len(h.token_ids),
                }
                for h in hits
            ],
        }

    return r


class _BodyLimit:
    """413 for request bodies over `max_bytes` (by Content-Length, or counted while reading)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over the limit of {self.max_bytes} bytes (max_body_bytes)"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, too_big)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_big)  # FastAPI passes HTTPException through body parsing
            return message

        await self.app(scope, counted, send)


class _Observe:
    """Request counts and latencies per route template, into the app's metrics."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            m = scope["app"].state.metrics if "app" in scope else None
            if m is not None:
                m.requests.labels(path, scope["method"], str(status[0])).inc()
                m.latency.labels(path).observe(time.perf_counter() - t0)
