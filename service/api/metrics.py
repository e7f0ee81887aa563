"""/metrics: Prometheus metrics for operators (no API key; PONDER_METRICS_ENABLED=false removes it)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.deps import RedisDep
from service.metrics import database_families, exposition, redis_families

router = APIRouter(tags=["operations"])
logger = logging.getLogger("ponder.api")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(redis: RedisDep) -> Response:
    """Prometheus text format: requests, jobs by status, queue depth, tokens by model, webhook deliveries."""
    families = []
    # A database or Redis outage leaves its metrics out rather than failing the scrape: the
    # request metrics (and Prometheus' own `up`) still tell the story.
    try:
        families += await run_in_threadpool(database_families)
    except Exception:
        logger.exception("metrics: the database did not answer")
    try:
        families += await redis_families(redis)
    except Exception:
        logger.exception("metrics: Redis did not answer")
    return Response(exposition(families), media_type=CONTENT_TYPE_LATEST)
