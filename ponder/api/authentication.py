"""Who is asking, answered from the request's headers before anything else costs: before its body is
read and before it takes one of the process's requests in flight (ponder/api/capacity.py). A client
without a valid key gets its 401 at once, however slowly it would send a body, and holds nothing
that a key's requests need.

A key is found in the process's KeyCache (no thread, no query), else by one query on the streams'
own row-read threads (ponder/service/threads.py:read_row): never on the threads of the requests in
flight; the requests of one token that miss the cache meanwhile share that query. At most
MAX_PENDING_LOOKUPS tokens wait for one at a time; beyond, 503 + Retry-After at once, so a flood of
made-up keys costs a bounded queue and no key's work."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from sqlmodel import Session
from starlette.datastructures import Headers

from ponder.api.errors import database_unavailable, overloaded, service_error_response
from ponder.service.db import DATABASE_DOWN, sql_engine
from ponder.service.errors import Unauthenticated
from ponder.service.security import KeyCache
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey
from ponder.service.threads import read_row

KEYED_PREFIX = "/v1/"
KEY_STATE = "api_key"  # scope["state"]: the key that authenticated the request (ponder/api/deps.py)
KEY_RECHECK = "api_key_recheck"  # scope["state"]: whether that key is still valid, asked again later
MAX_PENDING_LOOKUPS = 64
MISSING_KEY = "missing API key: send Authorization: Bearer <key>"
INVALID_KEY = "invalid or revoked API key"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


class AuthenticateFirst:
    """ASGI middleware: every request under KEYED_PREFIX (the API's own routes and the OpenAI ones,
    each of which depends on ponder/api/deps.py current_key) is authenticated before the app sees
    it; an unknown path there too, as OpenAI's API answers 401 to a request without a key whatever
    its path. Health, metrics (their own token) and the schema pages are not under it."""

    def __init__(self, app, settings: Settings, keys: KeyCache) -> None:
        self.app, self.settings, self.keys = app, settings, keys
        self.lookups: dict[str, asyncio.Future] = {}  # by token: one query for a crowd of misses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(KEYED_PREFIX):
            return await self.app(scope, receive, send)
        token = bearer_token(scope)
        if token is None:
            return await service_error_response(Unauthenticated(MISSING_KEY, headers=CHALLENGE))(scope, receive, send)
        try:
            key = await self._find(token)
        except _TooManyLookups:
            return await overloaded(self.settings.overload_retry_after_seconds)(scope, receive, send)
        except DATABASE_DOWN:
            return await database_unavailable(self.settings.overload_retry_after_seconds)(scope, receive, send)
        if key is None:
            return await service_error_response(Unauthenticated(INVALID_KEY, headers=CHALLENGE))(scope, receive, send)
        state = scope.setdefault("state", {})
        state[KEY_STATE], state[KEY_RECHECK] = key, functools.partial(self.still_valid, token)
        await self.app(scope, receive, send)

    async def still_valid(self, token: str) -> bool:
        """Whether the key is still valid (a stream or a wait asks at each step); when that cannot be
        asked now (too many lookups, the database away), yes."""
        try:
            return await self._find(token) is not None
        except (_TooManyLookups, *DATABASE_DOWN):
            return True

    async def _find(self, token: str) -> ApiKey | None:
        """The key: the cache, else one query on the stream threads, shared by every request of the
        same token that misses the cache meanwhile (a flood of one key costs one lookup); at most
        MAX_PENDING_LOOKUPS tokens looked up at a time (_TooManyLookups beyond)."""
        key = self.keys.get(token)
        if key is not None:
            return key
        lookup = self.lookups.get(token)
        if lookup is None:
            if len(self.lookups) >= MAX_PENDING_LOOKUPS:  # one event loop: no await between check and count
                raise _TooManyLookups
            lookup = asyncio.ensure_future(read_row(functools.partial(self._look_up, token)))
            self.lookups[token] = lookup
            lookup.add_done_callback(lambda _: self.lookups.pop(token, None))
        return await asyncio.shield(lookup)  # a waiter that goes away leaves it to the others

    def _look_up(self, token: str) -> ApiKey | None:
        with Session(sql_engine(self.settings)) as session:
            return self.keys.lookup(session, token)


class _TooManyLookups(Exception):
    pass


def bearer_token(scope) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the names in any case, as HTTPBearer reads them)."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def still_authorized(scope) -> Callable[[], Awaitable[bool]]:
    """The request's key check (AuthenticateFirst), for what outlives its start (a stream, a wait)."""
    recheck = scope.get("state", {}).get(KEY_RECHECK)
    return recheck if recheck is not None else _always


async def _always() -> bool:
    return True
