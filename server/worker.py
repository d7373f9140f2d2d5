"""ModelWorker: the one thread that runs model work, shared fairly between tenants.

The event loop never runs the model: `call(fn, tenant=...)`, `steps(gen_fn, tenant=...)` and
`stream(gen_fn, tenant=...)` hand work to a single worker thread and await it, so /healthz answers
while a request generates. Work is a generator run one step (one `next`) at a time. The thread
shares its time fairly between the tenants that have work: it steps the tenant that has used the
least model time so far, and a tenant that arrives (or comes back) starts at most `burst_s` behind
the others, so a short chat runs its few steps almost at once while a tenant flooding long documents
(ingested in small steps) waits a few steps, and a flood never holds the worker for its whole length.

Admission: at most `capacity` requests (running + waiting) and at most `per_tenant` of one tenant;
one more raises `QueueFull` (the app answers 429 + Retry-After). A request whose awaiting side is
gone (client disconnected, task cancelled) is cancelled: dropped from its queue before it starts, or
stopped between two steps, and its slot is freed. `close()` stops admitting and waits for the
admitted requests to finish.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
END = object()  # delivered after a task's last item
BURST_S = 0.25  # how far behind the busiest tenants a newly active tenant may start (its head start)


class QueueFull(RuntimeError):
    """The model queue (or one tenant's share of it) is at capacity."""


class ShuttingDown(RuntimeError):
    """The worker no longer admits requests."""


class Task:
    """One admitted request: its generator (made on the worker thread) and where its items go."""

    def __init__(self, tenant: str, gen_fn: Callable[[], Iterator], deliver: Callable[[Any], None]) -> None:
        self.tenant = tenant
        self.gen_fn = gen_fn
        self.gen: Iterator | None = None
        self.deliver = deliver  # called (thread-safely) with each item, then END or an exception
        self.cancelled = threading.Event()


class ModelWorker:
    """A single model thread, fair in model time across tenants, with admission limits."""

    def __init__(
        self,
        queue_size: int,
        init: Callable[[], None] | None = None,
        per_tenant: int | None = None,
        burst_s: float = BURST_S,
    ) -> None:
        self.capacity = queue_size + 1
        self.per_tenant = min(per_tenant or self.capacity, self.capacity)
        self._init = init
        self._cv = threading.Condition()
        self._queues: dict[str, deque[Task]] = {}  # tenant -> its tasks waiting for a step, in arrival order
        self._used: dict[str, float] = {}  # tenant -> model seconds used (shifted on return, see _enqueue)
        self.burst_s = burst_s
        self._admitted = 0
        self._by_tenant: Counter[str] = Counter()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ragkv-model", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests admitted and not yet finished (running + waiting)."""
        return self._admitted

    def in_flight(self, tenant: str) -> int:
        """Requests of `tenant` admitted and not yet finished."""
        return self._by_tenant[tenant]

    # -- the asyncio side ----------------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any, tenant: str = "default") -> T:
        """Run `fn(*args)` on the model thread (one step) and return its result (or raise its exception)."""

        def one() -> Iterator[T]:
            yield fn(*args)

        result = None
        async for item in self.stream(one, tenant):
            result = item
        return result  # type: ignore[return-value]

    async def steps(self, gen_fn: Callable[[], Iterator[T]], tenant: str = "default") -> AsyncIterator[T]:
        """Run `gen_fn()` step by step on the model thread, yielding its non-None items (None marks a step
        boundary only). Cancelling the awaiting task cancels the work between steps."""
        async for item in self.stream(gen_fn, tenant):
            if item is not None:
                yield item

    def stream(self, gen_fn: Callable[[], Iterator[T]], tenant: str = "default") -> AsyncIterator[T]:
        """Iterate `gen_fn()` on the model thread, yielding its items here as they come. Admission happens
        now (QueueFull is raised before any response starts); closing the returned iterator early (client
        gone) cancels the work: it leaves the queue, or stops before its next step."""
        return self._open(lambda deliver: Task(tenant, gen_fn, deliver))

    def _open(self, make_task: Callable[[Callable[[Any], None]], Task]) -> AsyncIterator:
        """Admit the task `make_task(deliver)` and iterate what it delivers (here, on the event loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        task = make_task(deliver)
        self._admit(task)
        return self._drain(queue, task)

    async def _drain(self, queue: asyncio.Queue, task: Task) -> AsyncIterator:
        try:
            while True:
                item = await queue.get()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._cancel(task)

    # -- admission and cancellation ------------------------------------------------------------------
    def _admit(self, task: Task) -> None:
        with self._cv:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.capacity:
                raise QueueFull(f"the model queue is full ({self.capacity - 1} waiting)")
            if self._by_tenant[task.tenant] >= self.per_tenant:
                raise QueueFull(
                    f"this tenant has {self._by_tenant[task.tenant]} requests in flight; "
                    f"the limit per tenant is {self.per_tenant}"
                )
            self._admitted += 1
            self._by_tenant[task.tenant] += 1
            self._enqueue(task)
            self._cv.notify()

    def _enqueue(self, task: Task) -> None:
        self._catch_up(task.tenant)
        self._queues.setdefault(task.tenant, deque()).append(task)

    def _busy_tenants(self) -> set[str]:
        """Tenants with work waiting or running (a subclass with more kinds of work adds them)."""
        return set(self._queues)

    def _catch_up(self, tenant: str) -> None:
        """A tenant that becomes active starts at most `burst_s` behind the least busy active tenant."""
        busy = self._busy_tenants()
        if tenant in busy:
            return
        active = [self._used[t] for t in busy]
        floor = min(active) - self.burst_s if active else 0.0
        self._used[tenant] = max(self._used.get(tenant, 0.0), floor)
        if not active:
            self._used = {tenant: 0.0}  # idle: forget the past

    def _cancel(self, task: Task) -> None:
        """The awaiting side is gone: drop the task if it waits, else flag it to stop between steps."""
        task.cancelled.set()
        with self._cv:
            q = self._queues.get(task.tenant)
            if q is not None and task in q:
                q.remove(task)
                if not q:
                    del self._queues[task.tenant]
                self._release(task)

    def _release(self, task: Task) -> None:
        """Free the task's admission slot (called with the lock held, once per task)."""
        self._admitted -= 1
        self._by_tenant[task.tenant] -= 1
        if not self._by_tenant[task.tenant]:
            del self._by_tenant[task.tenant]
        self._cv.notify_all()

    # -- the model thread ----------------------------------------------------------------------------
    def _next(self) -> Task | None:
        """The next task to step (None once closed and idle)."""
        with self._cv:
            while not self._queues:
                if self._closed:
                    return None
                self._cv.wait()
            return self._pop_fairest()

    def _pop_fairest(self) -> Task | None:
        """The oldest waiting task of the tenant that used the least time (called with the lock held)."""
        if not self._queues:
            return None
        tenant = min(self._queues, key=lambda t: self._used[t])  # ties: the tenant that arrived first
        q = self._queues[tenant]
        task = q.popleft()
        if not q:
            del self._queues[tenant]
        return task

    def _run(self) -> None:
        if self._init is not None:
            self._init()
        while (task := self._next()) is not None:
            self._run_step(task)

    def _run_step(self, task: Task) -> None:
        """One step of `task`, charged to its tenant; then it is requeued or its slot freed."""
        t0 = time.perf_counter()
        done, last = self._step(task)
        with self._cv:
            self._charge(task.tenant, time.perf_counter() - t0)
            if done:
                self._release(task)
            else:
                self._enqueue(task)  # behind this tenant's other work
        if last is not None:  # the end (or the error) once its slot is free: the caller sees depth without it
            task.deliver(last)

    def _charge(self, tenant: str, seconds: float) -> None:
        """Add model time to a tenant's clock (called with the lock held)."""
        self._used[tenant] = self._used.get(tenant, 0.0) + seconds

    def _step(self, task: Task) -> tuple[bool, Any]:
        """Run one step of `task`: (finished (ended, failed or cancelled), what to deliver once its slot is
        free: END or the error; None when nothing)."""
        try:
            if task.cancelled.is_set():
                if task.gen is not None:
                    task.gen.close()  # runs the generator's cleanup (e.g. an ingestion saves its index)
                return True, None
            if task.gen is None:
                task.gen = iter(task.gen_fn())
            task.deliver(next(task.gen))
            return False, None
        except StopIteration:
            return True, END
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting side
            return True, err

    def close(self, wait: bool = True) -> None:
        """Admit nothing more; with `wait`, return when every admitted request has finished."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            if wait:
                while self._admitted:
                    self._cv.wait()
        if wait:
            self._thread.join()
