"""Cancel a request's work when its client goes away.

`await cancel_on_disconnect(request, work)` awaits `work` while polling the ASGI connection; when the
client disconnects first, `work` is cancelled (which, for model work, frees its queue slot or stops it
between two steps: see worker.py) and the request ends with a 499 (nobody reads it any more).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from .errors import ApiError

T = TypeVar("T")
POLL_S = 0.25  # how often the connection is checked while work is pending


async def cancel_on_disconnect(request: Request, work: Awaitable[T], poll_s: float = POLL_S) -> T:
    """`await work`, cancelled as soon as the client of `request` has disconnected."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request; its work was cancelled")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
