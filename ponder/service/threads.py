"""Blocking work off the event loop, for the service's async code (streams, the OpenAI routes'
waits): the default threads (as many as requests in flight, ponder/api/capacity.py:size_threads),
the streams' own row-read threads, and a clean-up that must finish even while its request is torn
down. anyio's, as Starlette's are: no web framework here."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ponder.service.settings import STREAM_DB_THREADS

T = TypeVar("T")


async def run_in_threadpool(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` on a default thread (what starlette.concurrency's does)."""
    return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


_row_limiters: weakref.WeakKeyDictionary[Any, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


async def read_row(load: Callable[[], T]) -> T:
    """Run a stream's blocking row read off the event loop, on the streams' own threads."""
    loop = asyncio.get_running_loop()
    limiter = _row_limiters.get(loop)
    if limiter is None:
        limiter = _row_limiters[loop] = anyio.CapacityLimiter(STREAM_DB_THREADS)
    return await anyio.to_thread.run_sync(load, limiter=limiter)


async def run_shielded(function: Callable[..., Any], *args: Any) -> None:
    """A short blocking call that must finish even while its request is being torn down (a
    cancelled stream's clean-up), off the event loop."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(function, *args)
