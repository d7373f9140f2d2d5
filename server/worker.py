"""ModelWorker: the one thread that runs model work, behind a bounded queue.

The event loop never runs the model: `call(fn)` and `stream(gen_fn)` hand work to a single worker
thread and await it, so /healthz answers while a request generates. At most `capacity` requests are
admitted (running + waiting); one more raises `QueueFull` (the app answers 429 + Retry-After).
`close()` stops admitting and waits for the admitted requests to finish.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class QueueFull(RuntimeError):
    """The model queue is at capacity."""


class ShuttingDown(RuntimeError):
    """The worker no longer admits requests."""


class ModelWorker:
    """A single model thread with an admission limit of `queue_size` waiting + 1 running."""

    def __init__(self, queue_size: int, init: Callable[[], None] | None = None) -> None:
        self.capacity = queue_size + 1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragkv-model", initializer=init)
        self._lock = threading.Lock()
        self._admitted = 0
        self._closed = False

    @property
    def depth(self) -> int:
        """Requests admitted and not yet finished (running + waiting)."""
        return self._admitted

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.capacity:
                raise QueueFull(f"the model queue is full ({self.capacity - 1} waiting)")
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the model thread and return its result (or raise its exception)."""
        self._admit()

        def run() -> T:
            try:
                return fn(*args)
            finally:
                self._release()  # counted until the thread is done, even if the caller went away

        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, run)
        except BaseException:
            self._release()
            raise
        return await future

    def stream(self, gen_fn: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Iterate `gen_fn()` on the model thread, yielding its items here as they come. Admission and
        scheduling happen now (QueueFull is raised before any response starts); closing the returned
        iterator early (client gone) stops the generator at its next item."""
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                for item in gen_fn():
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if stop.is_set():
                        break
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                self._release()

        try:
            loop.run_in_executor(self._pool, run)
        except BaseException:
            self._release()
            raise
        return self._drain(queue, stop)

    @staticmethod
    async def _drain(queue: asyncio.Queue, stop: threading.Event) -> AsyncIterator:
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the thread finishes its current item and stops

    def close(self, wait: bool = True) -> None:
        """Admit nothing more; with `wait`, return when every admitted request has finished."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)
