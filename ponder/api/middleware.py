"""The app's own ASGI middleware: a request-size limit, request ids, and the x-ratelimit-* headers
of a rate-limited key's requests."""

from __future__ import annotations

import re
import time
import uuid

import anyio

from ponder.api.errors import REQUEST_ID_HEADER, error_response


class BodyLimits:
    """The request body, bounded in size and in time: 413 beyond `max_bytes` (announced by
    Content-Length or found as it arrives), 408 when it arrives slower than `min_rate` bytes a second
    once `grace_seconds` are spent (0: no rate). The body is read whole before the app is called (at
    most `max_bytes`, which FastAPI would read whole anyway), so the app's in-flight count (inside
    this) takes a request only with its body in hand: a client that sends headers and then nothing
    holds a socket, not a slot. `streamed_paths` (uploads, written to disk as they arrive) get their
    own limits and pass on as they arrive, under the same rules."""

    def __init__(
        self, app, max_bytes: int, streamed_paths: dict[str, int] | None = None, grace_seconds=10.0, min_rate=0
    ) -> None:
        self.app, self.default_max_bytes, self.streamed_paths = app, max_bytes, streamed_paths or {}
        self.grace_seconds, self.min_rate = grace_seconds, min_rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.streamed_paths.get(scope["path"], self.default_max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await _too_large(max_bytes)(scope, receive, send)
        body = _BoundedBody(receive, max_bytes, self.grace_seconds, self.min_rate)
        if scope["path"] in self.streamed_paths:
            return await self._streamed(scope, body, send)
        try:
            messages = await body.read_whole()
        except _BodyRefused as refused:
            return await refused.response(scope, receive, send)
        await self.app(scope, _replaying(messages, receive), send)

    async def _streamed(self, scope, body: _BoundedBody, send):
        refused: _BodyRefused | None = None
        started = False

        async def bounded_receive():
            nonlocal refused
            try:
                return await body.receive()
            except _BodyRefused as e:
                refused = e
                raise

        async def send_unless_refused(message):
            # FastAPI answers any error while it reads a body with a 400: once the body is refused,
            # what the app says is dropped and the refusal goes out instead.
            nonlocal started
            if refused is not None:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, send_unless_refused)
        except _BodyRefused:
            pass
        if refused is not None and not started:
            await refused.response(scope, body.raw_receive, send)


class _BodyRefused(Exception):
    def __init__(self, response) -> None:
        self.response = response


def _too_large(max_bytes: int):
    return error_response(413, f"the request body is larger than {max_bytes} bytes")


class _BoundedBody:
    """`receive` for the body's messages, refusing one over the size or arriving too slowly."""

    def __init__(self, receive, max_bytes: int, grace_seconds: float, min_rate: int) -> None:
        self.raw_receive, self.max_bytes = receive, max_bytes
        self.grace_seconds, self.min_rate = grace_seconds, min_rate
        self.started, self.received, self.complete = time.monotonic(), 0, False

    async def receive(self):
        if self.complete:  # the body is in: what follows (a disconnect) may take any time
            return await self.raw_receive()
        try:
            with anyio.fail_after(self._allowance()):
                message = await self.raw_receive()
        except TimeoutError:
            raise _BodyRefused(self._too_slow()) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise _BodyRefused(_too_large(self.max_bytes))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message

    async def read_whole(self) -> list[dict]:
        messages = [await self.receive()]
        while not self.complete:
            messages.append(await self.receive())
        return messages

    def _allowance(self) -> float | None:
        """Seconds the next message may take: the grace, then a second for every `min_rate` bytes
        received."""
        if not self.min_rate:
            return None
        deadline = self.started + self.grace_seconds + self.received / self.min_rate
        return max(deadline - time.monotonic(), 0.0)

    def _too_slow(self):
        message = (
            f"the request body arrived too slowly: at least {self.min_rate} bytes a second after the first "
            f"{self.grace_seconds:g} s"
        )
        return error_response(408, message, headers={"Connection": "close"})


def _replaying(messages: list[dict], receive):
    """The app's `receive`: the body's messages as they were read, then the connection's own."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


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
