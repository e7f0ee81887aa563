"""How much one API process takes on at once, and what it answers beyond (docs/operations.md#capacity).

- **Requests in flight** (`InFlightLimit`): at most `api_max_in_flight` requests of a process are
  being handled (admitted, not yet answered) at once, at most `api_max_in_flight_per_key` of them
  one key's (429 to that key beyond); one more is answered 503 with Retry-After
  at once, before any work, so an overload never ends as a database pool timeout (a 500 after
  30 s) and never after a job was committed. The blocking parts of those requests run on as many
  threads (`size_threads`), and the database pool holds a connection for each of them
  (`Settings._pool_holds_the_threads`), so no thread waits on the pool.
- **Streams** hold no thread and no connection while they stream: a request stops counting as in
  flight when its response starts, the route closes its session first (`release_session`), and
  the stream's row reads run on `STREAM_DB_THREADS` threads of their own
  (ponder/service/threads.py:read_row).
- **Streams per key** (`StreamSlots`): a Redis sorted set per API key of leases (member: one
  stream, score: when its lease lapses), so the cap holds across every API process; a stream
  renews its lease as it sends and removes it when it ends, whether the client finished or went
  away; a process that dies leaves leases that lapse within `STREAM_LEASE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session

from ponder.api.authentication import CHALLENGE, INVALID_KEY, KEY_STATE, still_authorized
from ponder.api.errors import database_unavailable, overloaded, service_error_response
from ponder.service.db import DATABASE_DOWN
from ponder.service.errors import LimitExceeded, Unauthenticated
from ponder.service.settings import Settings
from ponder.service.streams import sse
from ponder.service.threads import run_in_threadpool

logger = logging.getLogger("ponder.api")
T = TypeVar("T")

# Never refused: liveness and the operators' probes must answer most when the API is busiest.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_RELEASE = "ponder.release_slot"  # in the request's state: ends its in-flight count early
STREAM_LEASE_SECONDS = 60
_STREAM_KEY = "ponder:streams:{}"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REVOKED = "the API key was revoked: the stream ends"
# A key refused for its stream cap is refused again, in the in-flight check, for this long on the
# routes that always take one: a crowd of calls, each tried again as soon as it is refused, costs one
# Redis script a period, not one each (a slot freed meanwhile is taken at most this much later).
FULL_MEMO_SECONDS = 0.5
# The Retry-After of a refusal for the stream cap: a slot frees when one of the key's streams or
# waits ends, seconds to minutes for a reasoning job; a second made each refused call a retry a second.
STREAMS_RETRY_AFTER_SECONDS = 5
ALWAYS_STREAMS = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions")})  # a slot either way
_full_until: dict[uuid.UUID, float] = {}  # key id -> until when its streams are known to be full
MAX_KEY_RETRY_AFTER_SECONDS = 60  # OpenAI's SDKs wait out a Retry-After of up to a minute
# The API process's Redis connections for stream reads (redis-py's asyncio pool stops at 100 by
# default): a stream or a waiting request holds one while it waits for its job's next entry (XREAD
# BLOCK), so this bounds a process's live readers before they fall back to polling the row; and
# for commands, apart (ponder/api/app.py lifespan). 4 API processes x 2,200 stay under Redis'
# default maxclients (10,000).
REDIS_MAX_CONNECTIONS = 2000
REDIS_COMMAND_CONNECTIONS = 200


# -- requests in flight -----------------------------------------------------------------------------


class InFlightLimit:
    """ASGI middleware: at most `limit` requests handled at once in this process; beyond, 503 +
    Retry-After (OpenAI's error shape: its SDKs retry it after that long). Of those, one API key
    holds at most `per_key` (AuthenticateFirst has found the key): beyond, a 429 + Retry-After to
    that key alone, so that one key's flood (a crowd of calls, each tried again as soon as it is
    refused) never leaves another key only 503s. A request counts until its response starts (a
    stream's body does not count) or until it calls `release_slot` (a route about to wait long
    on Redis, holding nothing)."""

    def __init__(self, app, limit: int, per_key: int, streams_per_key: int, retry_after: int) -> None:
        self.app, self.limit, self.per_key, self.retry_after = app, limit, per_key, retry_after
        self.streams_per_key = streams_per_key
        self.in_flight = 0
        self.by_key: dict[object, int] = {}
        self.refusals: dict[object, tuple[int, int]] = {}  # key id -> (second, its refusals in it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        key = scope.get("state", {}).get(KEY_STATE)
        key_id = key.id if key is not None else None
        if key_id is not None and (scope["method"], scope["path"]) in ALWAYS_STREAMS and streams_full(key_id):
            wait = self._key_retry_after(key_id, STREAMS_RETRY_AFTER_SECONDS)
            refused = too_many_streams(self.streams_per_key, wait)
            return await service_error_response(refused)(scope, receive, send)
        # one event loop: no await between the checks and the counts
        if key_id is not None and self.by_key.get(key_id, 0) >= self.per_key:
            wait = self._key_retry_after(key_id, self.retry_after)
            return await service_error_response(too_many_in_flight(self.per_key, wait))(scope, receive, send)
        if self.in_flight >= self.limit:
            return await overloaded(self.retry_after)(scope, receive, send)
        self.in_flight += 1
        if key_id is not None:
            self.by_key[key_id] = self.by_key.get(key_id, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                if key_id is not None:
                    self.by_key[key_id] -= 1
                    if not self.by_key[key_id]:
                        del self.by_key[key_id]

        scope.setdefault("state", {})[_RELEASE] = release

        async def send_releasing(message):
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()

    def _key_retry_after(self, key_id, least: int) -> int:
        """The Retry-After of a key's refusal (in flight, or streams): `least`, or one second for
        each `per_key` refusals of the key in the current second (at most
        MAX_KEY_RETRY_AFTER_SECONDS). A client that keeps its slots busy with a crowd of calls,
        each retried as told, is told to wait longer the larger the crowd: N calls settle near
        sqrt(per_key x N) requests a second, not N; those beyond the minute's ramp are told a
        second drawn at random in its second half, so that they never come back together."""
        second = int(time.monotonic())
        start, refused = self.refusals.get(key_id, (second, 0))
        refused = refused + 1 if start == second else 1
        self.refusals[key_id] = (second, refused)
        ramp = math.ceil(refused / self.per_key)
        if ramp <= MAX_KEY_RETRY_AFTER_SECONDS:
            return max(least, ramp)
        # Beyond the ramp the crowd is spread over the minute's second half: all told the minute,
        # they came back within the same 0.2 s (1,500 of 2,000 calls) and stalled the API for 0.7 s;
        # spread over the whole of it, they came back sooner on average, and the API's load rose.
        return random.randint(max(least, MAX_KEY_RETRY_AFTER_SECONDS // 2), MAX_KEY_RETRY_AFTER_SECONDS)


def release_slot(request: Request) -> None:
    """This request no longer counts as in flight (it now only waits, holding no thread)."""
    release = request.scope.get("state", {}).get(_RELEASE)
    if release is not None:
        release()


def size_threads(settings: Settings) -> None:
    """The threads a process runs requests' blocking parts on: one per request in flight."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_max_in_flight


def install(app: FastAPI, settings: Settings) -> None:
    """The in-flight limit, and a 503 (not a 500) should a connection still not come in time or the
    database be away."""
    retry_after = settings.overload_retry_after_seconds
    app.add_middleware(
        InFlightLimit,
        limit=settings.api_max_in_flight,
        per_key=settings.api_max_in_flight_per_key,
        streams_per_key=settings.max_streams_per_key,
        retry_after=retry_after,
    )

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout):
        logger.warning("database pool timeout on %s %s: %s", request.method, request.url.path, exc)
        return overloaded(retry_after)

    # the database away (restarting, crashed): a 503, not a 500, and the connection kept for the retry
    for error in DATABASE_DOWN:

        @app.exception_handler(error)
        async def _database_down(request: Request, exc: Exception):
            logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
            return database_unavailable(retry_after)


# -- streams ----------------------------------------------------------------------------------------


async def release_session(session: Session) -> None:
    """End the request's session before a long stream or wait: its connection goes back to the pool
    (a session that read something holds one until it closes, and FastAPI closes it only after
    the response). What it loaded stays readable."""
    await run_in_threadpool(session.close)


# KEYS: the key's lease set. ARGV: stream id, limit, lease seconds. 1: admitted, 0: at the limit.
_ACQUIRE = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RENEW = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class StreamSlot:
    """One admitted stream's lease in its key's set."""

    def __init__(self, redis, key_id: uuid.UUID) -> None:
        self.redis, self.key, self.id = redis, _STREAM_KEY.format(key_id), uuid.uuid4().hex
        self.key_id = key_id
        self.renewed = 0.0

    async def acquire(self, limit: int) -> None:
        """Admit the stream, or 429 when the key has `limit` live streams already. When Redis
        cannot say, the stream is admitted (it will retry Redis itself)."""
        try:
            admitted = await self.redis.eval(_ACQUIRE, 1, self.key, self.id, limit, STREAM_LEASE_SECONDS)
        except RedisError as e:
            logger.warning("stream slots unavailable (%s); admitting the stream", e)
            return
        if not admitted:
            _full_until[self.key_id] = time.monotonic() + FULL_MEMO_SECONDS
            raise too_many_streams(limit)
        self.renewed = time.monotonic()

    async def renew(self) -> None:
        if time.monotonic() - self.renewed < STREAM_LEASE_SECONDS / 3:
            return
        self.renewed = time.monotonic()
        with contextlib.suppress(RedisError):
            await self.redis.eval(_RENEW, 1, self.key, self.id, STREAM_LEASE_SECONDS)

    async def release(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(RedisError):
            await self.redis.zrem(self.key, self.id)


def too_many_in_flight(per_key: int, retry_after: int) -> LimitExceeded:
    message = (
        f"this API key has {per_key} requests in flight in this process, the most one key may; "
        "retry after the Retry-After header's seconds"
    )
    return LimitExceeded(message, headers={"Retry-After": str(retry_after)}, code="too_many_requests_in_flight")


def too_many_streams(limit: int, retry_after: int = STREAMS_RETRY_AFTER_SECONDS) -> LimitExceeded:
    message = (
        f"this API key has {limit} streams and waiting requests open already "
        "(PONDER_MAX_STREAMS_PER_KEY); close one first"
    )
    return LimitExceeded(message, headers={"Retry-After": str(retry_after)}, code="too_many_streams")


def streams_full(key_id: uuid.UUID) -> bool:
    """Whether the key's stream slots were all taken a moment ago (FULL_MEMO_SECONDS)."""
    until = _full_until.get(key_id)
    if until is not None and until <= time.monotonic():
        del _full_until[key_id]
        return False
    return until is not None


async def open_stream(redis, key_id: uuid.UUID, settings: Settings) -> StreamSlot:
    """A stream slot of the key (429 beyond `max_streams_per_key`): taken before anything is
    created, so a refused stream leaves no job behind."""
    slot = StreamSlot(redis, key_id)
    await slot.acquire(settings.max_streams_per_key)
    return slot


async def create_for_stream(
    redis, key_id: uuid.UUID, settings: Settings, stream: bool, create: Callable[[], T]
) -> tuple[T, StreamSlot | None]:
    """`create()` (a job: off the event loop), taking a stream slot of the key first when the answer
    will be a stream: a refused stream (429) creates nothing, and a failed creation frees its slot."""
    slot = await open_stream(redis, key_id, settings) if stream else None
    try:
        return await run_in_threadpool(create), slot
    except BaseException:
        if slot is not None:
            await slot.release()
        raise


@contextlib.asynccontextmanager
async def holding(slot: StreamSlot, request: Request) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """For a wait on the job's stream: what to call at each of its steps (the slot's lease renewed,
    the key asked again: revoked, the wait ends 401), and the slot given back however it ends."""
    still_valid = still_authorized(request.scope)

    async def still_waiting() -> None:
        await slot.renew()
        if not await still_valid():
            raise Unauthenticated(INVALID_KEY, headers=CHALLENGE)

    try:
        yield still_waiting
    finally:
        await slot.release()


class SlotStreamingResponse(StreamingResponse):
    """An SSE response that holds a stream slot: renewed as it sends, released however it ends
    (finished, client gone, cancelled), and its event generator closed then, so that its own
    clean-up (cancelling an abandoned job) runs at once rather than whenever it is collected."""

    def __init__(self, events: AsyncIterator[str], slot: StreamSlot, headers: dict[str, str]) -> None:
        self.events, self.slot = events, slot
        super().__init__(self._renewing(), media_type="text/event-stream", headers=SSE_HEADERS | headers)

    async def _renewing(self) -> AsyncIterator[str]:
        async for chunk in self.events:
            yield chunk
            await self.slot.renew()
            if not await self.still_valid():  # revoked meanwhile: the stream ends, saying why
                yield sse("error", {"error": {"type": "authentication_error", "message": REVOKED, "code": None}})
                return

    async def __call__(self, scope, receive, send) -> None:
        self.still_valid = still_authorized(scope)
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self.slot.release()
