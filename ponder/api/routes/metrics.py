"""/metrics: Prometheus metrics for operators (no API key; PONDER_METRICS_TOKEN asks for a bearer
token; PONDER_METRICS_ENABLED=false removes it)."""

from __future__ import annotations

import logging
import secrets
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from ponder.api.cached import Cached
from ponder.api.deps import RedisDep, SettingsDep
from ponder.api.prometheus import database_families, exposition, redis_families
from ponder.service.db import sql_engine
from ponder.service.errors import Unauthenticated
from ponder.service.threads import run_in_threadpool

logger = logging.getLogger("ponder.api")
_bearer = HTTPBearer(auto_error=False)
# the database's numbers (a grouped count per table, a sum over finished jobs), counted in a thread
_database: Cached[list] = Cached(partial(run_in_threadpool, database_families), [])


def metrics_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With PONDER_METRICS_TOKEN set, scrapes send `Authorization: Bearer <token>` (a 401 otherwise)."""
    if settings.metrics_token is None:
        return
    given = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else ""
    if not secrets.compare_digest(given.encode(), settings.metrics_token.encode()):
        raise Unauthenticated(
            "/metrics needs the metrics token: Authorization: Bearer <PONDER_METRICS_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(tags=["operations"], dependencies=[Depends(metrics_token)])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus text format: requests, jobs by status, queue depth, tokens by model, webhook
    deliveries (the database's numbers at most PONDER_METRICS_CACHE_SECONDS old)."""
    families = []
    # A database or Redis outage leaves its metrics out rather than failing the scrape: the
    # request metrics (and Prometheus' own `up`) still tell the story.
    try:
        families += await _database.get(settings.metrics_cache_seconds, sql_engine(settings))
    except Exception:
        logger.exception("metrics: the database did not answer")
    try:
        families += await redis_families(redis)
    except Exception:
        logger.exception("metrics: Redis did not answer")
    return Response(exposition(families), media_type=CONTENT_TYPE_LATEST)
