"""The OpenAI-compatible endpoints: `POST /v1/chat/completions` and `POST /v1/completions`.

A request becomes a `Job` (question, chunks to fuse, blend options, namespace); the scheduler
(scheduler.py) builds its `FusionRequest` on the model thread and generates it with the others. The
reply is the OpenAI body plus `usage` and a `ragkv` object (TTFT and its parts, hits per tier,
misses, recompute fraction). With `stream: true` it is server-sent events ending in `[DONE]`;
the last chunk carries `finish_reason`, `usage` and `ragkv`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.answer import Answer
from ..engine.request import FusionRequest
from ..retriever import CatalogUnavailable
from .auth import tenant
from .disconnect import cancel_on_disconnect
from .engine_port import ServedEngine
from .errors import ApiError
from .json_body import ExactJsonRoute
from .schemas import ChatRequest, ChunkRef, CompletionRequest, TextDocument, chat_question

router = APIRouter(route_class=ExactJsonRoute)  # bodies read with exact integers


@dataclass
class Job:
    """One generation, resolved from a request; runs on the model worker."""

    question: str
    texts: list[tuple[int, str]]  # (position, text) of documents given as text
    refs: list[tuple[int, int]]  # (position, chunk_id) of documents given as ingested chunk ids
    retrieve_query: str | None
    retrieve_k: int
    strategy: str | None
    ratio: float | None
    answer_guard: float | None  # None: the server's blend.answer_guard
    max_new_tokens: int
    temperature: float
    namespace: str
    stream: bool = False  # server-sent events: tokens go out as decoded (none can be taken back)
    retrieved: list[dict] = field(default_factory=list)
    upstream: dict = field(default_factory=dict)  # proxy mode: what the inference server did (server.upstream)
    warnings: list[str] = field(default_factory=list)  # reported as `ragkv.warnings`

    @property
    def retrieved_nothing(self) -> bool:
        """Retrieval was asked for and found no chunk."""
        return self.retrieve_query is not None and not self.retrieved

    def resolve_chunks(self, engine, documents) -> list[list[int]]:
        """The chunks' token ids in order: texts, ingested chunk ids, then retrieved chunks."""
        chunks: list[list[int] | None] = [None] * (len(self.texts) + len(self.refs))
        for (pos, _), ids in zip(self.texts, engine.tokenize_chunks([t for _, t in self.texts])):
            chunks[pos] = ids
        if self.refs:
            try:
                resolved = documents.chunk_ids(self.namespace, [c for _, c in self.refs])
            except CatalogUnavailable as err:  # rows not read before the catalog went down: answer without them
                resolved = [None] * len(self.refs)
                self.warnings.append(f"{err}: answered without the documents given as chunk_id")
            for (pos, _), ids in zip(self.refs, resolved):
                chunks[pos] = ids
        if self.retrieve_query is not None:
            try:
                hits = documents.search(self.namespace, self.retrieve_query, self.retrieve_k)
            except CatalogUnavailable:  # no index open yet and the catalog is down: the answer's warnings say so
                hits = []
            for hit in hits:
                chunks.append(list(hit.token_ids))
                self.retrieved.append({"chunk_id": hit.chunk_id, "doc_id": hit.doc_id, "score": round(hit.score, 6)})
            if not self.retrieved:
                self.warnings.append(empty_retrieval_warning(self.namespace))
        return [c for c in chunks if c is not None]

    def request(self, engine: ServedEngine, documents) -> FusionRequest:
        """The engine's request: the resolved chunks, every default the job left open resolved once."""
        return engine.request(
            self.question,
            chunks=self.resolve_chunks(engine, documents),
            strategy=self.strategy,
            recompute_ratio=self.ratio,
            answer_guard=self.answer_guard,
            max_new_tokens=self.max_new_tokens,
            namespace=self.namespace,
            temperature=self.temperature,
            stream=self.stream,
        )


def empty_retrieval_warning(namespace: str) -> str:
    return (
        f"retrieval found no chunks: namespace {namespace!r} has no ingested documents "
        "(POST /v1/documents, or `ragkv ingest` for the default namespace); the answer uses no retrieved context"
    )


def make_job(req: ChatRequest | CompletionRequest, question: str, namespace: str, settings) -> Job:
    """Check the request against the server's limits and resolve it into a Job."""
    if len(question) > settings.max_question_chars:
        raise ApiError(
            400,
            f"the question has {len(question)} characters; the limit is {settings.max_question_chars}",
            "messages" if isinstance(req, ChatRequest) else "prompt",
        )
    docs = req.documents or []
    if len(docs) > settings.max_documents:
        raise ApiError(400, f"too many documents: {len(docs)}; the limit is {settings.max_documents}", "documents")
    texts, refs = [], []
    for i, d in enumerate(docs):
        if isinstance(d, ChunkRef):
            refs.append((i, d.chunk_id))
            continue
        text = d.text if isinstance(d, TextDocument) else d
        if not text.strip():
            raise ApiError(400, f"documents[{i}] is empty: every document needs some text", "documents")
        if len(text) > settings.max_document_chars:
            raise ApiError(
                400,
                f"documents[{i}] has {len(text)} characters; the limit is {settings.max_document_chars}",
                "documents",
            )
        texts.append((i, text))
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or settings.max_new_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {settings.max_tokens_limit}", "max_tokens")
    r = req.retrieve
    if r is not None and r.k > settings.max_retrieve_k:
        raise ApiError(400, f"retrieve.k {r.k} is over the limit of {settings.max_retrieve_k}", "retrieve")
    warnings = []
    k = 0 if r is None else min(r.k, settings.max_documents - len(docs))  # documents + retrieved <= the limit
    if r is not None and k < r.k:
        warnings.append(
            f"retrieve.k lowered from {r.k} to {k}: documents + retrieve.k may not exceed {settings.max_documents}"
        )
    blend = req.blend
    return Job(
        question=question,
        texts=texts,
        refs=refs,
        retrieve_query=None if r is None or k == 0 else (r.query or question),
        retrieve_k=k,
        strategy=blend.strategy if blend else None,
        ratio=blend.recompute_ratio if blend else None,
        answer_guard=blend.answer_guard if blend else None,
        max_new_tokens=max_tokens,
        temperature=req.temperature or 0.0,
        namespace=namespace,
        stream=bool(req.stream),
        warnings=warnings,
    )


def usage_and_ragkv(answer: Answer, job: Job, queue_ms: float) -> dict:
    """The `usage` and `ragkv` members of a response."""
    n = len(answer.token_ids)
    ragkv = {k: v for k, v in answer.to_dict().items() if k not in ("text", "token_ids")}
    ragkv.update(
        namespace=job.namespace,
        queue_ms=queue_ms,
        chunks=len(job.texts) + len(job.refs) + len(job.retrieved),
        retrieved=job.retrieved,
        warnings=[*job.warnings, *answer.warnings],  # empty retrieval; a shared tier unreachable
    )
    if job.upstream:
        ragkv["upstream"] = job.upstream
    return {
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": answer.prompt_tokens + n,
        },
        "ragkv": ragkv,
    }


def _finish(answer: Answer, job: Job) -> str:
    return "length" if len(answer.token_ids) >= job.max_new_tokens else "stop"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, namespace: str = Depends(tenant)):
    try:
        question = chat_question(body.messages)
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None
    job = make_job(body, question, namespace, request.app.state.settings)
    return await _respond(request, body, job, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, namespace: str = Depends(tenant)):
    question = (body.prompt if isinstance(body.prompt, str) else body.prompt[0]).strip()
    job = make_job(body, question, namespace, request.app.state.settings)
    return await _respond(request, body, job, chat=False)


async def _respond(request: Request, body, job: Job, chat: bool):
    state = request.app.state
    model = body.model or state.settings.model
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    t0 = time.perf_counter()
    upstream = getattr(state, "upstream", None)  # proxy mode: ragkv fuses, the upstream generates
    if upstream is not None:
        events = upstream.stream(job, state)
    else:
        events = state.worker.generate(lambda: job.request(state.engine, state.documents), job.namespace)
    # errors before the first token become a 4xx/5xx JSON reply; a client gone meanwhile cancels the job
    first = await cancel_on_disconnect(request, _first(events))

    def envelope(choice: dict, **extra) -> dict:
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra}

    if not body.stream:

        async def rest():
            answer = first
            async for item in _chain(first, events):
                if isinstance(item, Answer):
                    answer = item
            return answer

        answer = await cancel_on_disconnect(request, rest())
        state.metrics.observe_answer(answer, empty_retrieval=job.retrieved_nothing)
        state.tenant_counters.observe(job.namespace, answer)
        queue_ms = max(0.0, (time.perf_counter() - t0) * 1e3 - answer.ttft_ms - answer.decode_ms)
        extra = usage_and_ragkv(answer, job, queue_ms)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": _finish(answer, job),
                "logprobs": None,
            }
            return JSONResponse({**envelope(choice), "object": "chat.completion", **extra})
        choice = {"index": 0, "text": answer.text, "finish_reason": _finish(answer, job), "logprobs": None}
        return JSONResponse({**envelope(choice), **extra})

    async def sse() -> AsyncIterator[str]:
        if chat:
            yield _data(envelope({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
        try:
            async for item in _chain(first, events):
                if isinstance(item, Answer):
                    state.metrics.observe_answer(item, empty_retrieval=job.retrieved_nothing)
                    state.tenant_counters.observe(job.namespace, item)
                    qms = max(0.0, (time.perf_counter() - t0) * 1e3 - item.ttft_ms - item.decode_ms)
                    last = (
                        {"index": 0, "delta": {}, "finish_reason": _finish(item, job)}
                        if chat
                        else {"index": 0, "text": "", "finish_reason": _finish(item, job), "logprobs": None}
                    )
                    yield _data(envelope(last, **usage_and_ragkv(item, job, qms)))
                else:
                    piece = (
                        {"index": 0, "delta": {"content": item}, "finish_reason": None}
                        if chat
                        else {"index": 0, "text": item, "finish_reason": None, "logprobs": None}
                    )
                    yield _data(envelope(piece))
        except Exception as err:  # noqa: BLE001 - the stream has started: report in-band
            yield _data({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(events: AsyncIterator):
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "generation produced no answer") from None


async def _chain(first, events: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in events:
        yield item


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
