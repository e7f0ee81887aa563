"""The app's own ASGI middleware: a request-size limit, request ids, and the x-ratelimit-* headers
of a rate-limited key's requests."""

from __future__ import annotations

import re
import uuid

from ponder.api.errors import REQUEST_ID_HEADER, error_response


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
        received, over, started = 0, False, False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def send_unless_over(message):
            # FastAPI answers any error while it reads a body with a 400: once the limit is crossed,
            # what the app says is dropped and the 413 goes out instead.
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_unless_over)
        except _TooLarge:
            pass
        if over and not started:
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


STATE_KEY = "rate_limit_headers"  # request.state: the headers RateLimitHeaders adds to the response


class RateLimitHeaders:
    """ASGI middleware: the x-ratelimit-* headers an RateLimitCharge collected, on the response whatever
    produced it (a route's return, a 429, a stream)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            headers = scope.get("state", {}).get(STATE_KEY)
            if message["type"] == "http.response.start" and headers:
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in headers.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
