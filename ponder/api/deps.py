"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlmodel import Session

from ponder.api.authentication import CHALLENGE, KEY_STATE, MISSING_KEY
from ponder.api.middleware import STATE_KEY
from ponder.service.db import DATABASE_DOWN, sql_engine
from ponder.service.errors import Unauthenticated
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey

logger = logging.getLogger("ponder.api")


def app_settings(request: Request) -> Settings:
    """The settings the app was made with (ponder/api/app.py:create_app)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """The request's session. Objects stay readable after commit: a request that just wrote a row
    answers with it without reading it back. Closed after the answer went out: a database that went
    away meanwhile fails that close (its rollback), which must not turn into an error of a response
    already sent (the server then dropped the client's kept-alive connection); the pool discards the
    dead connection."""
    session = Session(sql_engine(settings), expire_on_commit=False)
    try:
        yield session
    finally:
        try:
            session.close()
        except DATABASE_DOWN as e:
            logger.warning("closing a request's session: the database is unavailable (%s)", type(e).__name__)


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False)


def current_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    """The key AuthenticateFirst (ponder/api/authentication.py) found from the request's headers
    before its body was read: every route that depends on this one is authenticated there.
    (`credentials`: the scheme the OpenAPI document shows.)"""
    key = request.scope.get("state", {}).get(KEY_STATE)
    if key is None:
        raise Unauthenticated(MISSING_KEY, headers=CHALLENGE)
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


async def get_redis(request: Request) -> AsyncIterator[Redis]:
    """The process's asyncio Redis client (made by the app's lifespan, decoded replies)."""
    yield request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


async def get_stream_redis(request: Request) -> AsyncIterator[Redis]:
    """The process's asyncio Redis client for blocking reads of job streams (a pool of their own)."""
    yield request.app.state.stream_redis


StreamRedisDep = Annotated[Redis, Depends(get_stream_redis)]


async def rate_limited(request: Request, key: CurrentKey, redis: RedisDep, settings: SettingsDep) -> RateLimitCharge:
    """Every job-creating route's first step: one request counted against the key's requests per
    minute (a 429 when over); the RateLimitCharge then reserves the job's tokens (ponder/service/job_rules.py
    create_job). Its x-ratelimit-* headers go on the response (ponder/api/middleware.py RateLimitHeaders)."""
    charge = RateLimitCharge.of(key, settings)
    setattr(request.state, STATE_KEY, charge.headers)
    await charge.count_request(redis)
    return charge


RateLimited = Annotated[RateLimitCharge, Depends(rate_limited)]
