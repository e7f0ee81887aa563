"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlmodel import Session

from ponder.service.db import get_session
from ponder.service.errors import ApiError
from ponder.service.models import ApiKey
from ponder.service.rate_limits import STATE_KEY, Admission
from ponder.service.security import KeyCache
from ponder.service.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False)
_keys = KeyCache(ttl=get_settings().api_key_cache_seconds)


def current_key(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing API key: send Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"})
    key = _keys.lookup(session, credentials.credentials)
    if key is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


async def get_redis(request: Request) -> AsyncIterator[Redis]:
    """The process's asyncio Redis client (made by the app's lifespan, decoded replies)."""
    yield request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


async def rate_limited(request: Request, key: CurrentKey, redis: RedisDep, settings: SettingsDep) -> Admission:
    """Every job-creating route's first step: one request counted against the key's requests per
    minute (a 429 when over); the Admission then reserves the job's tokens (ponder/service/jobs.py
    create_job). Its x-ratelimit-* headers go on the response (ponder/service/rate_limits.py RateLimitHeaders)."""
    admission = Admission.of(key, settings)
    setattr(request.state, STATE_KEY, admission.headers)
    await admission.count_request(redis)
    return admission


RateLimited = Annotated[Admission, Depends(rate_limited)]
