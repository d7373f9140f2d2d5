"""Proxy mode (`ragkv serve --upstream URL`): ragkv fuses, an inference server (vLLM) generates.

For each chat/completions request the model worker renders the prompt around the cached chunks, fuses
it (`Engine.run`) and publishes the fused KV of all but the last prompt token to a `FusedKVStore`
folder that vLLM's `RagkvConnector` reads. The request then goes to the upstream's `/v1/completions`
with the prompt as token ids, so both sides address the entry by identical ids; vLLM loads the entry
and prefills only the last token. If publishing fails, or the entry is gone or stale when vLLM looks,
vLLM prefills the whole prompt itself: slower, never a different prompt. The upstream's streamed text
comes back through the usual endpoints as `str` pieces and a final `Answer`; the `ragkv.upstream`
object says whether the entry was published, vLLM's usage, and where the time went.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from pydantic import ByteSize, TypeAdapter, ValidationError

from ..engine.answer import Answer
from .errors import ApiError
from .fused_store import FusedKVStore


@dataclass
class Prepared:
    """A fused and published prompt, ready to forward."""

    token_ids: list[int]
    published: bool
    publish_error: str | None
    handoff: str | None  # the hand-off path taken (cuda_ipc, shm, file), None if not published
    handoff_fallback: list[str]  # why better paths were not taken
    parts_ms: dict[str, float]
    hits: dict[str, int]
    misses: int
    recompute_fraction: float
    strategy: str
    ratio: float
    first_token: int  # ragkv's own greedy first token, for comparison with the upstream's
    t0: float  # perf_counter when fusing started


@dataclass
class Upstream:
    """Where fused prompts go: the upstream's base URL and the folder its connector reads."""

    url: str
    store: FusedKVStore
    model: str | None = None  # the upstream's served model name; None: the first of its /v1/models
    timeout_s: float = 600.0
    publish_dtype: object = None  # torch dtype of published entries (None: the engine's dtype)
    remove_after: bool = True  # delete each entry once the upstream has answered
    _client: httpx.AsyncClient | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"upstream URL {self.url!r} must start with http:// or https://")
        self.url = self.url.rstrip("/")

    # -- on the model worker: fuse and publish ---------------------------------------------------
    def prepare(self, job, engine, documents, model: str = "") -> Prepared:
        """Fuse the prompt and publish its KV for the upstream's `model` (the name the connector checks)."""
        t0 = time.perf_counter()
        chunks = job.resolve_chunks(engine, documents)
        run = engine.run(
            job.question,
            chunks=chunks,
            strategy=job.strategy,
            recompute_ratio=job.ratio,
            namespace=job.namespace,
            reserve=0,
        )
        ids = run.plan.input_ids.tolist()
        t1 = time.perf_counter()
        published, error, record = True, None, None
        try:
            kv = run.blend.prompt_kv()  # per layer (K, V) [1, H_kv, N, D]
            keys, values = [k for k, _ in kv], [v for _, v in kv]
            record = self.store.publish(ids, keys, values, dtype=self.publish_dtype, model=model)
        except (OSError, ValueError, RuntimeError) as err:  # vLLM then finds no entry and prefills itself
            published, error = False, f"{type(err).__name__}: {err}"
        parts = {**run.parts_ms, "publish": (time.perf_counter() - t1) * 1e3}
        blend = engine.config.blend
        return Prepared(
            token_ids=ids,
            published=published,
            publish_error=error,
            handoff=record.path if record else None,
            handoff_fallback=list(record.fallback) if record else [],
            parts_ms=parts,
            hits=run.hits,
            misses=run.misses,
            recompute_fraction=run.blend.recompute_fraction,
            strategy=job.strategy or blend.strategy,
            ratio=blend.recompute_ratio if job.ratio is None else job.ratio,
            first_token=int(run.logits.argmax()),
            t0=t0,
        )

    # -- on the event loop: forward and stream back ----------------------------------------------
    async def stream(self, job, state) -> AsyncIterator[str | Answer]:
        """Text pieces from the upstream, then an `Answer` (the events `Job.run` yields in-process)."""
        client = self._http()
        model = self.model or await self._served_model(client)
        prep = await state.worker.call(self.prepare, job, state.engine, state.documents, model)
        body = {
            "model": model,
            "prompt": prep.token_ids,
            "max_tokens": job.max_new_tokens,
            "temperature": job.temperature,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        t_send = time.perf_counter()
        t_first = None
        text, tokens, usage = "", [], None
        try:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    detail = (await reply.aread()).decode(errors="replace")[:500]
                    raise ApiError(502, f"upstream {self.url} answered {reply.status_code}: {detail}")
                async for event in _sse(reply):
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        tokens.extend(choice.get("token_ids") or [])
                        piece = choice.get("text") or ""
                        if piece:
                            t_first = t_first or time.perf_counter()
                            text += piece
                            yield piece
        except httpx.HTTPError as err:
            raise ApiError(502, f"upstream {self.url} failed: {type(err).__name__}: {err}") from None
        finally:  # vLLM has loaded it (or never will): unpin it; ragkv fuses afresh for every request
            if prep.published and self.remove_after:
                self.store.remove(prep.token_ids)
        t_end = time.perf_counter()
        t_first = t_first or t_end
        eos = state.engine.eos_ids
        tokens = [t for t in tokens if t not in eos]
        job.upstream.update(
            url=self.url,
            model=model,
            published=prep.published,
            publish_error=prep.publish_error,
            handoff=prep.handoff,
            handoff_fallback=prep.handoff_fallback,
            fused_tokens=len(prep.token_ids) - 1 if prep.published else 0,
            ragkv_first_token=prep.first_token,
            upstream_first_token=tokens[0] if tokens else None,
            completion_token_ids=tokens,
            usage=usage,
        )
        parts = {**prep.parts_ms, "upstream_first_token": (t_first - t_send) * 1e3}
        yield Answer(
            text=text.strip(),
            token_ids=tokens,
            strategy=prep.strategy,
            recompute_ratio=prep.ratio,
            ttft_ms=(t_first - prep.t0) * 1e3,
            parts_ms=parts,
            recompute_fraction=prep.recompute_fraction,
            prompt_tokens=len(prep.token_ids),
            hits=prep.hits,
            misses=prep.misses,
            decode_ms=(t_end - t_first) * 1e3,
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        return self._client

    async def _served_model(self, client: httpx.AsyncClient) -> str:
        try:
            reply = await client.get(f"{self.url}/v1/models")
            reply.raise_for_status()
            self.model = reply.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            raise ApiError(
                502, f"cannot read the served model from {self.url}/v1/models ({err}); pass --upstream-model"
            ) from None
        return self.model

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _sse(reply: httpx.Response) -> AsyncIterator[dict]:
    """The JSON objects of a server-sent event stream, up to `[DONE]`."""
    async for line in reply.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ApiError(502, f"upstream error: {event['error']}")
        yield event


def fused_store_of(fused_dir: str, handoff: str = "auto", budget: str = "8GiB", mode: str = "600") -> FusedKVStore:
    """The proxy's store from its command-line words (`budget` like "8GiB", `mode` octal like "640")."""
    try:
        budget_bytes = int(TypeAdapter(ByteSize).validate_python(budget))
    except ValidationError:
        raise ValueError(f"fused budget {budget!r} is not a size; accepted: bytes or e.g. 512MiB, 8GiB") from None
    try:
        entry_mode = int(mode, 8)
    except ValueError:
        raise ValueError(f"fused entry mode {mode!r} is not octal; accepted: e.g. 600, 640, 644") from None
    return FusedKVStore(fused_dir, budget_bytes=budget_bytes, handoff=handoff, entry_mode=entry_mode)


def fused_dir_default() -> str:
    """/dev/shm/ragkv-fused where /dev/shm exists (RAM, shared with a local vLLM), else a temp folder."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, "ragkv-fused")
