"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlmodel import Session

from service.db import get_session
from service.errors import ApiError
from service.models import ApiKey
from service.security import KeyCache
from service.settings import Settings, get_settings

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
