"""A real webhook receiver for tests: a threaded HTTP server on loopback that checks every request
with the independent `standardwebhooks` library (not Ponder's own verify) and records it.

How it answers depends on the path's first segment: /ok (200 with a 3000-byte body), /fail3
(500 three times, then 200), /busy (503 with Retry-After: 3 once, then 200), /gone (410), /hang
(the first request waits until `release` is set, then 200). A request whose signature no secret of its path verifies
gets 400, as a real receiver would answer."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    verified_by: list[int]  # indexes of the path's secrets that verify the request

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    secrets: dict[str, list[str]] = field(default_factory=dict)  # path -> secrets to verify with
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.at(path)) >= count:
                return self.at(path)
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.at(path))} requests, expected {count}")

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def verified_by(secrets: list[str], body: bytes, headers: dict[str, str]) -> list[int]:
    matches = []
    for i, secret in enumerate(secrets):
        try:
            Webhook(secret).verify(body, headers)
            matches.append(i)
        except WebhookVerificationError:
            pass
    return matches


def start_receiver() -> Receiver:
    receiver: Receiver | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.counts[self.path] += 1
                seen = receiver.counts[self.path]
            matches = verified_by(receiver.secrets.get(self.path, []), body, headers)
            status = 400 if not matches else self._status(seen)
            with receiver.lock:
                receiver.requests.append(Received(self.path, headers, body, status, matches))
            if self.path.startswith("/hang/") and seen == 1:
                receiver.release.wait(30)
            payload = b"x" * 3000 if status == 200 else b"no"
            try:
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "3")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the sender is gone (killed mid-request)
                pass

        def _status(self, seen: int) -> int:
            kind = self.path.split("/")[1]
            if kind == "gone":
                return 410
            if kind == "fail3" and seen <= 3:
                return 500
            return 503 if kind == "busy" and seen == 1 else 200

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True).start()
    return receiver
