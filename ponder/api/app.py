"""The FastAPI application: routers, the JSON error format, a request-size limit and request ids,
built by `create_app` when the process starts (never at import)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from ponder.api import capacity
from ponder.api.authentication import AuthenticateFirst
from ponder.api.errors import install_error_handlers
from ponder.api.middleware import BodyLimits, RateLimitHeaders, RequestId
from ponder.api.prometheus import HttpMetrics
from ponder.api.routes import (
    deliveries,
    health,
    jobs,
    metrics,
    openai_batches,
    openai_chat,
    openai_completions,
    openai_files,
    openai_models,
    openai_responses,
    usage,
    webhooks,
)
from ponder.api.uploads import MULTIPART_SLACK
from ponder.service.prompts import served_model
from ponder.service.runtime import freeze_startup_objects
from ponder.service.security import KeyCache
from ponder.service.settings import Settings, get_settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    # Two pools. Commands (rate limits, stream slots, readiness): a request that finds them all
    # busy waits for one, a few seconds at most. Blocking reads of job streams (XREAD BLOCK, one
    # connection per live stream or waiting request): when they are all taken, readers poll the
    # row instead (ponder/service/streams.py read_job_events), and the commands never go without.
    # The socket timeout must outlast the blocking XREAD (2 s).
    options = {"decode_responses": True, "socket_timeout": 30, "socket_connect_timeout": 5}
    app.state.redis = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=capacity.REDIS_COMMAND_CONNECTIONS, timeout=5, **options
        )
    )
    app.state.stream_redis = aioredis.from_url(
        settings.redis_url, max_connections=capacity.REDIS_MAX_CONNECTIONS, **options
    )
    served_model(settings.model, settings.engine.max_model_len)  # the tokenizer loads now, not in a request
    capacity.size_threads(settings)  # one thread per request in flight, each with a pooled connection
    freeze_startup_objects()  # a full collection does not stall requests walking what lives for ever
    yield
    await app.state.redis.aclose()
    await app.state.stream_redis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app on `settings` (the environment's when not given): `ponder api` runs it through
    uvicorn's factory mode, so nothing is built or read at import."""
    settings = settings or get_settings()
    settings.check_api()
    app = FastAPI(
        title="Ponder",
        version="0.1.0",
        summary="Async jobs for long LLM reasoning (DeepSeek-R1 family)",
        lifespan=lifespan,
        # PONDER_DOCS_ENABLED (off by default in production): the schema maps every route
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    app.state.api_keys = KeyCache(ttl=settings.api_key_cache_seconds)
    app.state.readiness = health.readiness()
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(usage.router)
    app.include_router(webhooks.router)
    app.include_router(deliveries.router)
    app.include_router(health.router)
    app.include_router(openai_models.router)
    app.include_router(openai_chat.router)
    app.include_router(openai_completions.router)
    app.include_router(openai_responses.router)
    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    # an upload is a file of up to PONDER_MAX_FILE_BYTES in its multipart framing
    upload_limit = {"/v1/files": settings.max_file_bytes + MULTIPART_SLACK}
    # From the inside out (the last added sees a request first):
    app.add_middleware(RateLimitHeaders)  # x-ratelimit-* of a limited key's submissions, 429s included
    capacity.install(app, settings)  # requests in flight: 503 + Retry-After beyond, once the body is in
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_request_bytes,
        streamed_paths=upload_limit,
        grace_seconds=settings.api_body_grace_seconds,
        min_rate=settings.api_body_min_rate,
    )
    # who asks, from the headers, before any body is read or any slot taken
    app.add_middleware(AuthenticateFirst, settings=settings, keys=app.state.api_keys)
    app.add_middleware(RequestId)  # outside the rest: a 401, 408 or 413 has an id too
    if settings.metrics_enabled:
        app.include_router(metrics.router)
        app.add_middleware(HttpMetrics)  # outermost: it sees the 413s too
    return app
