"""The FastAPI application: routers, the JSON error format, a request-size limit and request ids."""

from __future__ import annotations

import re
import uuid
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from ponder.service import capacity
from ponder.service.api import (
    deliveries,
    health,
    jobs,
    metrics,
    openai_batches,
    openai_chat,
    openai_files,
    openai_models,
    openai_responses,
    usage,
    webhooks,
)
from ponder.service.errors import REQUEST_ID_HEADER, error_response, install_error_handlers
from ponder.service.metrics import RequestMetrics
from ponder.service.openai_files import MULTIPART_SLACK
from ponder.service.prompts import served_model
from ponder.service.rate_limits import RateLimitHeaders
from ponder.service.runtime import freeze_startup_objects
from ponder.service.settings import get_settings


class BodySizeLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed in chunks.
    `path_limits`: other limits for some paths (file uploads)."""

    def __init__(self, app, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app, self.default_max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.path_limits.get(scope["path"], self.default_max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await self._too_large(scope, receive, send, max_bytes)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(scope, receive, send, max_bytes)

    async def _too_large(self, scope, receive, send, max_bytes: int):
        response = error_response(413, f"the request body is larger than {max_bytes} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class RequestId:
    """`x-request-id` on every response: the client's own when it sent a plausible one (a proxy's
    id then follows the request through), else `req_<random hex>`. OpenAI's SDKs show it on errors
    (`request_id`); it is in `request.state.request_id` for logs."""

    _CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode())
        request_id = given if given and self._CLIENT_ID.match(given) else f"req_{uuid.uuid4().hex}".encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    # The socket timeout must outlast the stream endpoint's blocking XREAD (2 s).
    app.state.redis = aioredis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        max_connections=capacity.REDIS_MAX_CONNECTIONS,
    )
    served_model(settings.model, settings.engine.max_model_len)  # the tokenizer loads now, not in a request
    capacity.size_threads(settings)  # one thread per request in flight, each with a pooled connection
    freeze_startup_objects()  # a full collection does not stall requests walking what lives for ever
    yield
    await app.state.redis.aclose()


def create_app() -> FastAPI:
    settings = get_settings()
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
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(usage.router)
    app.include_router(webhooks.router)
    app.include_router(deliveries.router)
    app.include_router(health.router)
    app.include_router(openai_models.router)
    app.include_router(openai_chat.router)
    app.include_router(openai_responses.router)
    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    # an upload is a file of up to PONDER_MAX_FILE_BYTES in its multipart framing
    upload_limit = {"/v1/files": settings.max_file_bytes + MULTIPART_SLACK}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, path_limits=upload_limit)
    app.add_middleware(RateLimitHeaders)  # x-ratelimit-* of a limited key's submissions, 429s included
    capacity.install(app, settings)  # requests in flight: 503 + Retry-After beyond (outside the size limit)
    app.add_middleware(RequestId)  # outside the size limit: a 413 has an id too
    if settings.metrics_enabled:
        app.include_router(metrics.router)
        app.add_middleware(RequestMetrics)  # outermost: it sees the 413s too
    return app


app = create_app()
