"""An answer computed at most once per `ttl` seconds in a process, however often it is asked for
(concurrent askers wait for the one computation): what operators' routes poll (/metrics'
database numbers, /readyz's checks) costs queries that must not run on every request."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Cached(Generic[T]):
    def __init__(self, compute: Callable[..., Awaitable[T]], empty: T) -> None:
        self.compute, self.value = compute, empty
        self.computed_at = -math.inf
        self.lock = asyncio.Lock()

    async def get(self, ttl: float, *args: Any) -> T:
        async with self.lock:
            if time.monotonic() - self.computed_at >= ttl:
                self.value = await self.compute(*args)
                self.computed_at = time.monotonic()
            return self.value
