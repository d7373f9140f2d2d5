"""Scheduler: the sidecar's model thread, with continuous batching of generations.

It is a `ModelWorker` (one thread, admission limits, fairness in model time, cancellation) that also
takes generations: `generate(prepare, tenant)` admits a request like any other work (QueueFull ->
429) and yields its text pieces, then its `Answer`. Each turn of the model thread:

1. **join**: waiting generations join the running batch in fair order (round-robin over tenants,
   the tenant that used the least model time first) while the engine's `BatchBudget` allows
   (engine/batch_budget.py, the one size estimate: the joining requests' prompt tokens fused in one
   pass, and their K/V buffers next to those the running streams hold); their requests are built
   (`prepare`, on this thread) and fused together (`engine.batch.fuse_many`, within the same budget).
   A request larger than the budget joins only an empty batch and runs alone; a request that does
   not fit waits at the head (the ones behind it do not overtake it). At most `join_tokens` prompt
   tokens join in one turn (setting `server.join_tokens`; default: the budget's tokens, so a burst is
   fused in one packed pass). A smaller value fuses a burst in several groups between decode steps:
   the first requests' first tokens come sooner (lower p50 TTFT), the last ones' later and the
   throughput is lower (on the CPU, 8 clients: docs/BENCHMARKS.md).
2. **decode**: one `step_many` over every running stream: each gets its next token, its text piece
   (detokenized incrementally, as `Engine.answer_events` does) goes to its client as soon as it is
   picked (before the batch's next-token pass), its first token releases its fusion (the store's
   deferred upkeep); a finished stream gets its `Answer` and leaves.
   A stream whose next greedy step is a near-tie under its answer guard sits the step out: then one
   such stream per turn gets its exact KV (the guard's full prefill, seconds on a CPU for a long
   prompt) alone, so that the other streams and the joining requests never wait for several at once;
   while requests wait to join, it waits for them (a few turns at most).
   A stream whose client is gone leaves before the step, alone.
3. **other work**: one step of the fairest waiting generic task (document ingestion, retrieval, the
   proxy mode's fusions through `call`), so neither kind starves the other.

Model time is charged to tenants: a fusion's time split between the requests fused together, a
decode step's between the streams it advanced. An answer's `ttft_ms` runs from the moment its request
joined the batch to the step that gave its first token (the part spent on the other requests of the
batch is `parts_ms["batch"]`); the time before joining is the response's `queue_ms`.

With `batched=False` (setting `server.scheduler = "one"`, or an engine that cannot batch) a
generation is one generic task over `engine.answer_events`, stepped a token at a time between the
other tasks, as before batching.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from ..engine.answer import Answer
from ..engine.batch import fuse_many, go_exact, start_stream, step_many
from ..engine.batch_budget import BatchBudget, RequestSize, estimate, within
from ..engine.request import FusionRequest
from .engine_port import BatchingEngine, ServedEngine
from .worker import BURST_S, END, ModelWorker, Task

SIT_OUT_TURNS = 4  # turns a stream's switch to exact KV may wait for requests joining the batch


class _Generation(Task):
    """One generation: waiting (its request built on first look), then a stream of the running batch."""

    def __init__(self, tenant: str, prepare: Callable[[], FusionRequest], deliver: Callable[[Any], None]) -> None:
        super().__init__(tenant, None, deliver)  # type: ignore[arg-type]
        self.prepare = prepare
        self.request: FusionRequest | None = None
        self.size = RequestSize(0, 0)  # batch_budget.estimate(engine, request)
        self.stream = None  # engine.batch.TokenStream while running
        self.joined = 0.0  # perf_counter when it joined the batch
        self.first: float | None = None  # perf_counter when its first token went out
        self.answer_tokens: list[int] = []  # EOS excluded
        self.text = ""
        self.sat_out = 0  # turns its switch to exact KV waited for joining requests (Scheduler._switch_one)


class Scheduler(ModelWorker):
    """The model thread: generic work stepped fairly, generations decoded together under a token budget."""

    def __init__(
        self,
        engine: ServedEngine,
        queue_size: int,
        budget: BatchBudget | None = None,
        batched: bool = True,
        join_tokens: int | None = None,
        init: Callable[[], None] | None = None,
        per_tenant: int | None = None,
        burst_s: float = BURST_S,
    ) -> None:
        self.engine = engine
        self.batched = batched and isinstance(engine, BatchingEngine)
        self.budget = budget or (BatchBudget.of(engine) if self.batched else None)  # the engine's by default
        self.join_tokens = join_tokens or (self.budget.tokens if self.budget else 0)  # None: the whole budget
        self._waiting: dict[str, deque[_Generation]] = {}  # tenant -> generations not yet in the batch
        self._running: list[_Generation] = []  # the batch (only the model thread touches it)
        super().__init__(queue_size, init=init, per_tenant=per_tenant, burst_s=burst_s)

    # -- the asyncio side ----------------------------------------------------------------------------
    def generate(self, prepare: Callable[[], FusionRequest], tenant: str = "default") -> AsyncIterator[str | Answer]:
        """Text pieces, then the `Answer`, of the request `prepare()` builds (on the model thread).
        Admission happens now (QueueFull before any response starts); closing the iterator early
        (client gone) takes the request out of the queue or the batch, and nothing else."""
        if not self.batched:
            return self.stream(lambda: self.engine.answer_events(prepare()), tenant)
        return self._open(lambda deliver: _Generation(tenant, prepare, deliver))

    @property
    def running(self) -> int:
        """Generations in the batch now."""
        return len(self._running)

    # -- queues: generations wait apart from generic tasks, on the same clocks -----------------------
    def _enqueue(self, task: Task) -> None:
        if not isinstance(task, _Generation):
            return super()._enqueue(task)
        self._catch_up(task.tenant)
        self._waiting.setdefault(task.tenant, deque()).append(task)

    def _busy_tenants(self) -> set[str]:
        return super()._busy_tenants() | set(self._waiting) | {g.tenant for g in self._running}

    def _cancel(self, task: Task) -> None:
        if not isinstance(task, _Generation):
            return super()._cancel(task)
        task.cancelled.set()  # running: it leaves the batch before the next step
        with self._cv:
            if self._unwait(task):
                self._release(task)

    def _unwait(self, g: _Generation) -> bool:
        """Take `g` out of its tenant's waiting queue (lock held); False when it was not there."""
        q = self._waiting.get(g.tenant)
        if q is None or g not in q:
            return False
        q.remove(g)
        if not q:
            del self._waiting[g.tenant]
        return True

    def _fair_order(self) -> list[_Generation]:
        """Waiting generations, round-robin over tenants, the least model time used first (lock held)."""
        queues = [list(self._waiting[t]) for t in sorted(self._waiting, key=lambda t: self._used[t])]
        rounds = max(map(len, queues), default=0)
        return [q[i] for i in range(rounds) for q in queues if i < len(q)]

    # -- the model thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        if self._init is not None:
            self._init()
        while self._has_work():
            self._leave_cancelled()
            self._join(self._choose_joining())
            if self._running:
                self._decode_step()
                self._switch_one()
            with self._cv:
                task = self._pop_fairest()
            if task is not None:
                self._run_step(task)

    def _has_work(self) -> bool:
        """Wait for work; False once closed and idle."""
        with self._cv:
            while not (self._queues or self._waiting or self._running):
                if self._closed:
                    return False
                self._cv.wait()
            return True

    def _choose_joining(self) -> list[_Generation]:
        """The waiting generations that join the batch now, in fair order, within the budget: their
        prompt tokens in one pass, their K/V buffers next to those the running streams hold."""
        with self._cv:
            candidates = self._fair_order()
        held = sum(g.stream.kv_bytes for g in self._running)
        chosen: list[_Generation] = []
        for g in candidates:
            if g.request is None and not self._prepare(g):
                continue
            sizes = [c.size for c in chosen] + [g.size]
            alone = not self._running and not chosen
            if not alone and not within(sizes, self.budget, held):
                break  # it waits at the head for room; the ones behind it do not overtake it
            if chosen and sum(s.tokens for s in sizes) > self.join_tokens:
                break  # the rest of a burst joins in the next turns, between decode steps
            chosen.append(g)
            if not within([g.size], self.budget):
                break  # oversized: runs alone
        with self._cv:
            return [g for g in chosen if self._unwait(g)]  # a client gone meanwhile: already released

    def _prepare(self, g: _Generation) -> bool:
        """Build `g`'s request (chunks resolved, defaults filled); a failure goes to its client."""
        t0 = time.perf_counter()
        try:
            g.request = g.prepare()
            g.size = estimate(self.engine, g.request)
            return True
        except Exception as err:  # noqa: BLE001 - handed to the awaiting side (a 4xx or 5xx there)
            with self._cv:
                if self._unwait(g):
                    g.deliver(err)
                    self._release(g)
            return False
        finally:
            with self._cv:
                self._charge(g.tenant, time.perf_counter() - t0)

    def _join(self, joining: list[_Generation]) -> None:
        """Fuse the joining requests together and add their streams to the batch."""
        if not joining:
            return
        t0 = time.perf_counter()
        for g in joining:
            g.joined = t0
        for g, fusion in zip(joining, self._fuse(joining)):
            if fusion is None:
                continue
            g.stream = start_stream(fusion, self.engine.answer_guard(fusion.run))
            self._running.append(g)
        self._charge_evenly(joining, time.perf_counter() - t0)
        for g in [g for g in joining if g.stream is not None and g.stream.done]:  # max_new_tokens 0
            self._finish(g)

    def _fuse(self, joining: list[_Generation]) -> list:
        """Each joining request's Fusion (None for one that failed: its client gets the error). When the
        group fails, each is fused alone so that one bad request fails alone."""
        try:
            return fuse_many(self.engine, [g.request for g in joining], budget=self.budget)
        except Exception as err:  # noqa: BLE001
            if len(joining) == 1:
                self._fail(joining[0], err)
                return [None]
        fusions = []
        for g in joining:
            try:
                fusions.append(fuse_many(self.engine, [g.request], budget=self.budget)[0])
            except Exception as err:  # noqa: BLE001
                self._fail(g, err)
                fusions.append(None)
        return fusions

    def _decode_step(self) -> None:
        """One token for every stream of the batch but those waiting on exact KV (`_switch_one`); finished
        streams get their Answer and leave."""
        batch = [g for g in self._running if not g.stream.costly_pick]
        if not batch:
            return
        t0 = time.perf_counter()
        try:  # each token goes out as soon as it is picked, before the batch's next-token pass
            step_many(self.engine, [g.stream for g in batch], lambda i, token: self._emit(batch[i], token))
        except Exception as err:  # noqa: BLE001 - the step failed for the whole batch
            for g in batch:
                self._fail(g, err)
            return
        self._charge_evenly(batch, time.perf_counter() - t0)
        for g in batch:
            if g.stream.done:
                self._finish(g)

    def _switch_one(self) -> None:
        """One stream whose next step is a guarded near-tie moves onto exact KV (the answer guard's exact
        prefill, a full prefill of its prompt): alone, after the turn's joins and decode step, so that
        neither the batch's other streams nor the requests waiting to join wait for several; the tenant
        that used the least model time first. While requests wait to join, it waits for their first
        tokens (up to `SIT_OUT_TURNS` turns). The stream picks its token in the next decode step."""
        waiting = [g for g in self._running if g.stream.costly_pick and not g.cancelled.is_set()]
        if not waiting:
            return
        with self._cv:
            joining = bool(self._waiting)
            g = min(waiting, key=lambda g: self._used.get(g.tenant, 0.0))
        if joining and max(w.sat_out for w in waiting) < SIT_OUT_TURNS:  # first tokens first
            for w in waiting:
                w.sat_out += 1
            return
        t0 = time.perf_counter()
        try:
            go_exact(g.stream)
        except Exception as err:  # noqa: BLE001 - this stream fails alone
            self._fail(g, err)
        with self._cv:
            self._charge(g.tenant, time.perf_counter() - t0)

    def _emit(self, g: _Generation, token: int) -> None:
        """Hand the new token's text piece to the client; after the first token, release the fusion."""
        if g.first is None:
            g.first = time.perf_counter()
            g.stream.fusion.release()  # the store's deferred upkeep, once the first token is out
        if token in self.engine.eos_ids:
            return
        g.answer_tokens = list(g.stream.tokens)  # EOS only comes last; a request read whole may have taken some back
        full = self.engine.tokenizer.decode(g.answer_tokens, skip_special_tokens=True)
        piece, g.text = (full[len(g.text) :] if full.startswith(g.text) else ""), full
        if piece:
            g.deliver(piece)

    def _finish(self, g: _Generation) -> None:
        """The stream is done: its Answer (TTFT from joining the batch), then the end; it leaves."""
        fusion = g.stream.fusion
        fusion.release()
        answer = self.engine.answer(fusion, g.answer_tokens, g.text, g.stream.guard)
        now = time.perf_counter()
        first = g.first or now
        ttft_ms = (first - g.joined) * 1e3
        parts = {**answer.parts_ms, "batch": max(0.0, ttft_ms - answer.ttft_ms)}  # the batch's other requests
        g.deliver(replace(answer, ttft_ms=max(ttft_ms, answer.ttft_ms), parts_ms=parts, decode_ms=(now - first) * 1e3))
        g.deliver(END)
        self._leave(g)
        self.engine.after_answer(fusion)  # off the stream: it has ended

    def _fail(self, g: _Generation, err: BaseException) -> None:
        if g.stream is not None:
            g.stream.fusion.release()
        g.deliver(err)
        self._leave(g)

    def _leave(self, g: _Generation) -> None:
        if g in self._running:
            self._running.remove(g)
        with self._cv:
            self._release(g)

    def _leave_cancelled(self) -> None:
        """Streams whose client is gone leave the batch (their fusion released); the others go on."""
        for g in [g for g in self._running if g.cancelled.is_set()]:
            g.stream.fusion.release()
            self._leave(g)

    def _charge_evenly(self, gens: list[_Generation], seconds: float) -> None:
        with self._cv:
            for g in gens:
                self._charge(g.tenant, seconds / len(gens))
