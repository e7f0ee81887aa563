"""A snapshot of every route's answers: the real app (its factory and lifespan, a private SQLite
database, a Redis database of its own, no worker: jobs stay queued) asked a fixed sequence of
requests that touches every (method, path) of `app.routes`: per route the unauthenticated answer,
a not-found where there is an id, a validation failure (422 on Ponder's routes, 400 on the OpenAI
ones) and a success where one needs no worker. Each answer is kept as its status, some headers and
its body with the volatile values (ids, secrets, keys, times, cursors, durations) replaced by
placeholders numbered in order of first appearance (equal ids stay equal), beside the OpenAPI
schema. A refactor that must not change behaviour checks against the snapshot recorded before it.

    python -m tests.route_snapshot record   # writes tests/data/route_snapshot.json
    python -m tests.route_snapshot check    # compares; a unified diff and exit status 1 on a difference

The same file runs on the tree before the app moved (ponder.api.app) and after
(ponder.api.app). tests/service/test_route_snapshot.py runs `check` in a process of its own."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import faulthandler
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).resolve().parent / "data" / "route_snapshot.json"
MODEL = "tiny-llama"
METRICS_TOKEN = "snapshot-metrics-token"
# The fixed windows of the rate limits are this long (in seconds): the next boundary is in 2033, so
# no run straddles one and the x-ratelimit-remaining-* counts are the same every time.
RATE_WINDOW_SECONDS = "1000000000"
MAX_REQUEST_BYTES = 65536  # a 413 without a megabyte of body
MAX_FILE_BYTES = 4096
MISSING_UUID = "00000000-0000-4000-8000-000000000000"
# Recorded headers: what a client reads. Not dates, lengths (they follow the ids' lengths), servers.
KEPT_HEADERS = re.compile(
    r"^(content-type|www-authenticate|retry-after|retry-after-ms|x-should-retry|x-ratelimit-.*|location|"
    r"content-disposition|allow|cache-control|x-ponder-.*|x-request-id)$"
)
# How long a run may take before it is taken for hung (a request that waits for a worker).
RUN_TIMEOUT_SECONDS = 600


# -- normalization ---------------------------------------------------------------------------------


class Normalizer:
    """Volatile values to placeholders. `<kind:N>` numbers each distinct value of a kind in order of
    first appearance over the whole run (an id in a later path gets the placeholder it had in the
    body that made it). Values whose equality is a matter of timing (whole-second times and dates,
    durations, Redis stream ids) get a placeholder without a number."""

    _UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    _PATTERN = re.compile(
        "|".join(
            (
                r"(?P<secret>whsec_[A-Za-z0-9+/=_-]+)",
                r"(?P<apikey>pdr_[A-Za-z0-9_-]{8,})",
                rf"(?P<uuid>(?<![0-9A-Za-z]){_UUID}(?![0-9A-Za-z]))",
                r"(?P<datetime>(?<!\d)\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)",
                r"(?P<date>(?<!\d)\d{4}-\d{2}-\d{2}(?!\d))",
                r"(?P<streamid>(?<![\d.])1[6-9]\d{11}-\d+(?![\d.]))",
                r"(?P<hex>(?<![0-9A-Za-z])(?=[0-9]*[a-f])[0-9a-f]{16,64}(?![0-9A-Za-z]))",
                r"(?P<unixms>(?<![\d.])1[6-9]\d{11}(?![\d.-]))",
                r"(?P<unix>(?<![\d.])1[6-9]\d{8}(?:\.\d+)?(?![\d.]))",
                r'(?P<durkey>"[A-Za-z_]*(?:seconds|_ms|duration|elapsed|latency)[A-Za-z_]*"\s*:\s*)'
                r"(?P<duration>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)",
                r'(?P<cursorkey>"next_cursor"\s*:\s*")(?P<cursor>[^"]+)',
                r"(?P<cursorparam>[?&]cursor=)(?P<cursorvalue>[^&\s]+)",
            )
        )
    )

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], int] = {}
        self.counts: dict[str, int] = {}

    def number(self, kind: str, value: str) -> int:
        if (kind, value) not in self.seen:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.seen[kind, value] = self.counts[kind]
        return self.seen[kind, value]

    def _replace(self, match: re.Match) -> str:
        group = match.lastgroup
        text = match.group(0)
        if match.group("secret"):
            return f"<whsec:{self.number('whsec', text)}>"
        if match.group("apikey"):
            return f"<api-key:{self.number('api-key', text)}>"
        if match.group("uuid"):
            return f"<uuid:{self.number('uuid', text.lower())}>"
        if match.group("datetime"):  # microseconds: two are equal when they are one value
            return f"<datetime:{self.number('datetime', text)}>"
        if match.group("date"):
            return "<date>"
        if match.group("streamid"):
            return "<stream-id>"
        if match.group("hex"):
            if len(text) == 32:  # a uuid's hex: the placeholder of the uuid
                return f"<uuid-hex:{self.number('uuid', str(uuid.UUID(text)))}>"
            return f"<hex:{self.number('hex', text)}>"
        if match.group("unixms"):
            return "<unix-ms>"
        if match.group("unix"):
            return "<unix-time>"
        if match.group("durkey"):
            return match.group("durkey") + "<duration>"
        if match.group("cursorkey"):
            return match.group("cursorkey") + f"<cursor:{self.number('cursor', match.group('cursor'))}>"
        if match.group("cursorparam"):
            return match.group("cursorparam") + f"<cursor:{self.number('cursor', match.group('cursorvalue'))}>"
        raise AssertionError(group)

    def text(self, value: str) -> str:
        return self._PATTERN.sub(self._replace, value)

    def header(self, name: str, value: str) -> str:
        if name.startswith("x-ratelimit-reset-"):
            return "<duration>"
        if name == "x-request-id":
            return "<generated>" if re.fullmatch(r"req_[0-9a-f]{32}", value) else value
        return self.text(value)


def metric_families(text: str) -> str:
    """/metrics: its samples' values move with time and traffic; the families it has do not."""
    families = sorted({" ".join(line.split()[2:4]) for line in text.splitlines() if line.startswith("# TYPE ")})
    return "\n".join(families)


# -- the run ----------------------------------------------------------------------------------------


def _app_module():
    """ponder.api.app (after the refactor) or ponder.api.app (before it). Decided by the files
    of the `ponder` that is imported: the editable install's finder would otherwise find a module
    the tree lacks in the checkout it was installed from."""
    import ponder

    moved = (Path(ponder.__file__).parent / "api" / "app.py").is_file()
    return importlib.import_module("ponder.api.app" if moved else "ponder.api.app")


def _engine_function():
    from ponder.service import db

    return getattr(db, "database_engine", None) or db.get_engine  # by URL: here, or before 238ff72


def _environment(workdir: Path, database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "PONDER_ENV_FILE": os.devnull,
        "PONDER_ENVIRONMENT": "test",
        "PONDER_DATA_DIR": str(workdir),
        "PONDER_DATABASE_URL": database_url,
        "PONDER_REDIS_URL": redis_url,
        "PONDER_FILES_DIR": str(workdir / "files"),
        "PONDER_MODEL": MODEL,
        "PONDER_DOCS_ENABLED": "1",
        "PONDER_METRICS_ENABLED": "1",
        "PONDER_METRICS_TOKEN": METRICS_TOKEN,
        "PONDER_FLOWER_PASSWORD": "snapshot-flower-password",
        "PONDER_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "PONDER_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "PONDER_RATE_LIMIT_WINDOW_SECONDS": RATE_WINDOW_SECONDS,
        "PONDER_RATE_LIMIT_DAY_SECONDS": RATE_WINDOW_SECONDS,
        "PONDER_API_KEY_CACHE_SECONDS": "0",
    }


@contextlib.contextmanager
def _settings_environment(values: dict[str, str]) -> Iterator[None]:
    """Only `values` of PONDER_ (the model cache and the tests' own knobs kept), restored after."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("PONDER_")]:
        if name != "PONDER_MODEL_DIR" and not name.startswith("PONDER_TEST_"):
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _clear_caches() -> None:
    from ponder.service.settings import get_settings

    get_settings.cache_clear()
    _engine_function().cache_clear()


def default_redis_db() -> int:
    """Next to the process's stack database, as the other tests that build the app take it
    (tests/service/test_operator_routes.py): a process runs one test at a time, each flushing it."""
    return int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1


def take_snapshot(workdir: Path, redis_db: int | None = None) -> dict[str, Any]:
    from tests.stack import start_redis

    workdir.mkdir(parents=True, exist_ok=True)
    redis_url, redis_process = start_redis(workdir, db=default_redis_db() if redis_db is None else redis_db)
    database_url = f"sqlite:///{workdir / 'ponder.db'}"
    try:
        with _settings_environment(_environment(workdir, database_url, redis_url)):
            _clear_caches()
            try:
                return _run(database_url)
            finally:
                _clear_caches()
    finally:
        if redis_process is not None:
            redis_process.kill()


def _run(database_url: str) -> dict[str, Any]:
    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from ponder.service.db import upgrade
    from ponder.service.security import create_api_key

    upgrade(database_url)
    with Session(_engine_function()(database_url)) as session:
        _, main_key = create_api_key(
            session,
            "snapshot",
            {
                "requests_per_minute": 1000,
                "tokens_per_minute": 1_000_000,
                "tokens_per_day": 10_000_000,
                "max_concurrent_jobs": 100,
            },
        )
        _, tight_key = create_api_key(
            session, "tight", {"requests_per_minute": 100, "tokens_per_minute": 1000, "max_concurrent_jobs": 1}
        )
    app = _app_module().create_app()
    normalizer = Normalizer()
    for key in (main_key, tight_key):
        normalizer.number("api-key", key)
    with TestClient(app) as client:
        calls = Calls(client, normalizer, {"main": main_key, "tight": tight_key})
        requests(calls)
    missing = sorted(f"{m} {p}" for m, p in api_routes(app) - calls.covered(app))
    if missing:
        raise AssertionError(f"routes no request reached: {missing}")
    _one_tree()
    openapi = json.dumps(app.openapi(), sort_keys=True, indent=1)
    return {
        "routes": sorted(f"{m} {p}" for m, p in api_routes(app)),
        "requests": calls.records,
        "openapi": openapi.splitlines(),
    }


def _one_tree() -> None:
    """Every ponder module imported came from the tree of `ponder` itself (not through the editable
    install's finder from another checkout)."""
    import ponder

    root = Path(ponder.__file__).resolve().parent
    strays = sorted(
        name
        for name, module in list(sys.modules.items())
        if (name == "ponder" or name.startswith("ponder."))
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(root)
    )
    if strays:
        raise AssertionError(f"modules from outside {root}: {strays}")


def _route_contexts(app) -> list:
    """app.routes with the routers FastAPI includes lazily (0.165: _IncludedRouter) opened up."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def api_routes(app) -> set[tuple[str, str]]:
    from fastapi.routing import APIRoute

    routes = set()
    for route in _route_contexts(app):
        if isinstance(getattr(route, "original_route", route), APIRoute):
            routes |= {(method, route.path) for method in route.methods}
    return routes


class Calls:
    """Requests and their recorded answers."""

    def __init__(self, client, normalizer: Normalizer, keys: dict[str, str]) -> None:
        self.client, self.normalizer, self.keys = client, normalizer, keys
        self.records: list[dict[str, Any]] = []
        self.sent: list[tuple[str, str]] = []

    def __call__(self, method: str, path: str, auth: str | None = "main", **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        if auth in self.keys:
            headers["Authorization"] = f"Bearer {self.keys[auth]}"
        elif auth is not None:  # a header as given
            headers["Authorization"] = auth
        response = self.client.request(method, path, headers=headers, **kwargs)
        self.sent.append((method, path.split("?", 1)[0]))
        n = self.normalizer
        body = response.text
        if path.startswith("/metrics") and response.status_code == 200:
            body = metric_families(body)
        elif path.startswith("/openapi.json") and response.status_code == 200 and body:
            body = f"sha256 {hashlib.sha256(body.encode()).hexdigest()} (the schema: 'openapi')"
        else:
            body = n.text(body)
        record = {
            "request": f"{method} {n.text(path)}",
            "auth": auth if auth in self.keys or auth is None else n.text(auth),
            "status": response.status_code,
            "headers": {
                name: n.header(name, value)
                for name, value in sorted(response.headers.items())
                if KEPT_HEADERS.match(name)
            },
            "body": body,
        }
        self.records.append(record)
        return response

    def covered(self, app) -> set[tuple[str, str]]:
        """The (method, route path) each request was routed to (the first route that matches, as
        the router takes it)."""
        from starlette.routing import compile_path

        routes = [
            (route.methods or set(), route.path, compile_path(route.path)[0])
            for route in _route_contexts(app)
            if getattr(route, "path", None)
        ]
        covered = set()
        for method, path in self.sent:
            for methods, route_path, regex in routes:
                if regex.match(path) and method in methods:
                    covered.add((method, route_path))
                    break
        return covered


def _id(response, field: str = "id") -> str:
    assert response.status_code < 300, (response.status_code, response.text)
    return response.json()[field]


BATCH_LINES = (
    "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
            }
        )
        + "\n"
        for i in range(3)
    )
).encode()


def requests(call: Calls) -> None:
    """The sequence. Nothing here may wait for a worker: a chat completion or response that is not
    `background`, a stream of a job not yet final (only their refusals are asked for)."""
    missing = MISSING_UUID
    wrong_key = "Bearer pdr_not-a-key-at-all"

    # operations
    call("GET", "/healthz", auth=None)
    call("HEAD", "/healthz", auth=None)
    call("POST", "/healthz", auth=None)
    call("GET", "/readyz", auth=None)
    call("GET", "/metrics", auth=None)
    call("GET", "/metrics", auth="Bearer wrong-token")
    call("GET", "/metrics", auth="Basic c25hcHNob3Q6dG9rZW4=")
    call("GET", "/metrics", auth=f"Bearer {METRICS_TOKEN}")
    call("GET", "/openapi.json", auth=None)
    call("HEAD", "/openapi.json", auth=None)
    call("GET", "/docs", auth=None)
    call("GET", "/docs/oauth2-redirect", auth=None)
    call("GET", "/redoc", auth=None)
    call("GET", "/no/such/route", auth=None)
    call("GET", "/healthz", auth=None, headers={"X-Request-Id": "snapshot-request-1"})

    # /v1/models
    call("GET", "/v1/models", auth=None)
    call("GET", "/v1/models", auth=wrong_key)
    call("GET", "/v1/models", auth="Basic c25hcHNob3Q6dG9rZW4=")
    call("GET", "/v1/models")
    call("GET", f"/v1/models/{MODEL}", auth=None)
    call("GET", f"/v1/models/{MODEL}")
    call("GET", "/v1/models/org/other-model")

    # /v1/jobs: create
    job_body = {"prompt": "What is 2 + 2?", "max_tokens": 16, "seed": 7, "metadata": {"case": "one"}}
    call("POST", "/v1/jobs", auth=None, json=job_body)
    call("POST", "/v1/jobs", auth=wrong_key, json=job_body)
    call("POST", "/v1/jobs", json={})
    call("POST", "/v1/jobs", json={"prompt": "x", "temperature": 5, "top_p": 0})
    call("POST", "/v1/jobs", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    call("POST", "/v1/jobs", json={"prompt": "x", "webhook_url": "not a url"})
    call("POST", "/v1/jobs", json={"prompt": "x", "model": "other-model"})
    call("POST", "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    call("POST", "/v1/jobs", content=b"x" * (MAX_REQUEST_BYTES + 1), headers={"Content-Type": "application/json"})
    call("POST", "/v1/jobs", json=job_body, headers={"Idempotency-Key": "x" * 256})
    job1 = _id(call("POST", "/v1/jobs", json=job_body))
    job2 = _id(call("POST", "/v1/jobs", json={**job_body, "seed": 8}, headers={"Idempotency-Key": "snapshot-2"}))
    call("POST", "/v1/jobs", json={**job_body, "seed": 8}, headers={"Idempotency-Key": "snapshot-2"})
    job3 = _id(
        call(
            "POST",
            "/v1/jobs",
            json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "n": 2, "math": True},
        )
    )

    # /v1/jobs: read
    call("GET", "/v1/jobs", auth=None)
    call("GET", "/v1/jobs")
    page = call("GET", "/v1/jobs?limit=1").json()
    call("GET", f"/v1/jobs?limit=1&cursor={page['next_cursor']}")
    call("GET", "/v1/jobs?status=queued&limit=2")
    call("GET", "/v1/jobs?status=bogus")
    call("GET", "/v1/jobs?limit=0")
    call("GET", "/v1/jobs?cursor=not-a-cursor")
    call("GET", f"/v1/jobs/{job1}", auth=None)
    call("GET", f"/v1/jobs/{job1}")
    call("GET", f"/v1/jobs/{job1}", auth="tight")  # another key's job
    call("GET", f"/v1/jobs/{missing}")
    call("GET", "/v1/jobs/not-a-uuid")

    # /v1/webhooks (before the cancels below: their job.cancelled events make deliveries)
    hook = {"url": "http://127.0.0.1:9/hook", "description": "snapshot"}
    call("POST", "/v1/webhooks", auth=None, json=hook)
    call("POST", "/v1/webhooks", json={"url": "not a url"})
    call("POST", "/v1/webhooks", json={**hook, "events": ["job.nope"]})
    call("POST", "/v1/webhooks", json={**hook, "unknown": 1})
    webhook1 = _id(call("POST", "/v1/webhooks", json=hook))
    webhook2 = _id(call("POST", "/v1/webhooks", json={**hook, "events": ["job.started", "job.succeeded"]}))
    call("GET", "/v1/webhooks", auth=None)
    call("GET", "/v1/webhooks")
    call("GET", "/v1/webhooks/default-secret", auth=None)
    call("GET", "/v1/webhooks/default-secret")
    call("GET", f"/v1/webhooks/{webhook1}", auth=None)
    call("GET", f"/v1/webhooks/{webhook1}")
    call("GET", f"/v1/webhooks/{webhook1}", auth="tight")
    call("GET", f"/v1/webhooks/{missing}")
    call("GET", "/v1/webhooks/not-a-uuid")
    call("POST", f"/v1/webhooks/{webhook1}/rotate-secret", auth=None)
    call("POST", f"/v1/webhooks/{webhook1}/rotate-secret")
    call("POST", f"/v1/webhooks/{webhook1}/rotate-secret", json={"grace_seconds": 60})
    call("POST", f"/v1/webhooks/{webhook1}/rotate-secret", json={"grace_seconds": -1})
    call("POST", f"/v1/webhooks/{missing}/rotate-secret")
    call("POST", "/v1/webhooks/not-a-uuid/rotate-secret")
    call("GET", f"/v1/webhooks/{webhook1}")
    call("POST", f"/v1/webhooks/{webhook1}/enable", auth=None)
    call("POST", f"/v1/webhooks/{webhook1}/enable")
    call("POST", f"/v1/webhooks/{missing}/enable")
    call("POST", "/v1/webhooks/not-a-uuid/enable")
    call("DELETE", f"/v1/webhooks/{webhook2}", auth=None)
    call("DELETE", f"/v1/webhooks/{webhook2}")
    call("DELETE", f"/v1/webhooks/{webhook2}")
    call("POST", f"/v1/webhooks/{webhook2}/enable")
    call("DELETE", f"/v1/webhooks/{missing}")
    call("DELETE", "/v1/webhooks/not-a-uuid")

    # /v1/jobs: cancel, delete, stream
    call("POST", f"/v1/jobs/{job1}/cancel", auth=None)
    call("POST", f"/v1/jobs/{job1}/cancel")
    call("POST", f"/v1/jobs/{job1}/cancel")
    call("POST", f"/v1/jobs/{job2}/cancel", auth="tight")
    call("POST", f"/v1/jobs/{missing}/cancel")
    call("POST", "/v1/jobs/not-a-uuid/cancel")
    call("POST", f"/v1/jobs/{job3}/cancel")
    call("DELETE", f"/v1/jobs/{job2}", auth=None)
    call("DELETE", f"/v1/jobs/{job2}")  # queued: 409
    call("DELETE", f"/v1/jobs/{job1}")
    call("DELETE", f"/v1/jobs/{job1}")
    call("GET", f"/v1/jobs/{job1}")
    call("DELETE", f"/v1/jobs/{missing}")
    call("DELETE", "/v1/jobs/not-a-uuid")
    call("GET", f"/v1/jobs/{job3}/stream", auth=None)
    call("GET", f"/v1/jobs/{job3}/stream", headers={"Last-Event-ID": "not an id"})
    call("GET", f"/v1/jobs/{missing}/stream")
    call("GET", "/v1/jobs/not-a-uuid/stream")
    call("GET", f"/v1/jobs/{job3}/stream")  # cancelled: its events end at once
    call("GET", f"/v1/jobs/{job1}/stream")  # cancelled and erased

    # deliveries (the job.cancelled events of job1 and job3 to webhook1)
    call("GET", f"/v1/jobs/{job1}/deliveries", auth=None)
    deliveries = call("GET", f"/v1/jobs/{job1}/deliveries").json()["data"]
    call("GET", f"/v1/jobs/{job3}/deliveries")
    call("GET", f"/v1/jobs/{job2}/deliveries")
    call("GET", f"/v1/jobs/{missing}/deliveries")
    call("GET", "/v1/jobs/not-a-uuid/deliveries")
    delivery = deliveries[0]["id"] if deliveries else missing
    call("GET", f"/v1/deliveries/{delivery}", auth=None)
    call("GET", f"/v1/deliveries/{delivery}")
    call("GET", f"/v1/deliveries/{delivery}", auth="tight")
    call("GET", f"/v1/deliveries/{missing}")
    call("GET", "/v1/deliveries/not-a-uuid")
    call("POST", f"/v1/deliveries/{delivery}/redeliver", auth=None)
    call("POST", f"/v1/deliveries/{delivery}/redeliver")
    call("POST", f"/v1/deliveries/{missing}/redeliver")
    call("POST", "/v1/deliveries/not-a-uuid/redeliver")
    call("GET", f"/v1/deliveries/{delivery}")

    # rate limits: the tight key holds one live job at most, 1000 tokens a minute
    tight_body = {"prompt": "What is 3 + 3?", "max_tokens": 16}
    tight1 = _id(call("POST", "/v1/jobs", auth="tight", json=tight_body))
    call("POST", "/v1/jobs", auth="tight", json=tight_body)  # a second live job: 429
    call("POST", "/v1/jobs", auth="tight", json={**tight_body, "max_tokens": 1500})  # never admissible
    call("POST", f"/v1/jobs/{tight1}/cancel", auth="tight")
    call("POST", "/v1/jobs", auth="tight", json=tight_body)  # the cancelled one left its place
    call("GET", "/v1/jobs", auth="tight")

    # /v1/usage
    call("GET", "/v1/usage", auth=None)
    call("GET", "/v1/usage")
    call("GET", "/v1/usage", auth="tight")

    # /v1/chat/completions: only what is refused before a job is queued (a valid one waits for it)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    call("POST", "/v1/chat/completions", auth=None, json=chat)
    call("POST", "/v1/chat/completions", auth=wrong_key, json=chat)
    call("POST", "/v1/chat/completions", json={})
    call("POST", "/v1/chat/completions", json={"model": MODEL, "messages": []})
    call("POST", "/v1/chat/completions", json={**chat, "unknown_field": 1})
    call("POST", "/v1/chat/completions", json={**chat, "temperature": "hot"})
    call("POST", "/v1/chat/completions", json={**chat, "model": "other-model"})
    call("POST", "/v1/chat/completions", json={**chat, "messages": [{"role": "wizard", "content": "Hi"}]})
    call("POST", "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    call("POST", "/v1/chat/completions", json={**chat, "stream": True, "n": 100})

    # /v1/completions: likewise, only refusals
    legacy = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    call("POST", "/v1/completions", auth=None, json=legacy)
    call("POST", "/v1/completions", json={})
    call("POST", "/v1/completions", json={**legacy, "suffix": "x"})
    call("POST", "/v1/completions", json={**legacy, "max_tokens": 0})
    call("POST", "/v1/completions", json={**legacy, "prompt": [10**9]})

    # /v1/responses
    background = {"model": MODEL, "input": "What is 2 + 2?", "background": True, "max_output_tokens": 16}
    call("POST", "/v1/responses", auth=None, json=background)
    call("POST", "/v1/responses", json={})
    call("POST", "/v1/responses", json={**background, "unknown_field": 1})
    call("POST", "/v1/responses", json={**background, "model": "other-model"})
    call("POST", "/v1/responses", json={**background, "input": 5})
    response1 = _id(call("POST", "/v1/responses", json={**background, "metadata": {"case": "one"}}))
    response2 = _id(
        call(
            "POST",
            "/v1/responses",
            json={
                **background,
                "input": [{"role": "user", "content": "Say hi."}],
                "instructions": "Be brief.",
                "reasoning": {"effort": "low"},
                "user": "someone",
            },
        )
    )
    call("GET", f"/v1/responses/{response1}", auth=None)
    call("GET", f"/v1/responses/{response1}")
    call("GET", f"/v1/responses/{response1}", auth="tight")
    call("GET", f"/v1/responses/{response1}?include[]=reasoning.encrypted_content")
    call("GET", f"/v1/responses/{response1}?starting_after=1")
    call("GET", f"/v1/responses/{response1}?stream=true&starting_after=-1")
    call("GET", f"/v1/responses/{response1}?stream=maybe")
    call("GET", "/v1/responses/resp_00000000000000000000000000000000")
    call("GET", "/v1/responses/not-a-response")
    call("POST", f"/v1/responses/{response1}/cancel", auth=None)
    call("POST", f"/v1/responses/{response1}/cancel")
    call("POST", f"/v1/responses/{response1}/cancel")  # ended already: as it is
    call("POST", "/v1/responses/resp_00000000000000000000000000000000/cancel")
    call("POST", "/v1/responses/not-a-response/cancel")
    call("GET", f"/v1/responses/{response1}")
    call("GET", f"/v1/responses/{response1}?stream=true")  # cancelled: its events end at once
    call("GET", f"/v1/responses/{response1}?stream=true&starting_after=1")
    call("GET", f"/v1/jobs/{response2.removeprefix('resp_')}")
    call("POST", f"/v1/responses/{response2}/cancel")

    # /v1/files
    upload = {"file": ("requests.jsonl", BATCH_LINES, "application/jsonl")}
    call("POST", "/v1/files", auth=None, files=upload, data={"purpose": "batch"})
    call("POST", "/v1/files", data={"purpose": "batch"})
    call("POST", "/v1/files", files=upload, data={"purpose": "fine-tune"})
    call("POST", "/v1/files", files=upload)
    call("POST", "/v1/files", json={"purpose": "batch"})
    big = {"file": ("big.jsonl", b"x" * (MAX_FILE_BYTES + 1), "application/jsonl")}
    call("POST", "/v1/files", files=big, data={"purpose": "batch"})
    file1 = _id(call("POST", "/v1/files", files=upload, data={"purpose": "batch"}))
    file2 = _id(
        call(
            "POST",
            "/v1/files",
            files={"file": ("other.jsonl", b'{"custom_id": "a"}\n', "application/jsonl")},
            data={"purpose": "batch"},
        )
    )
    call("GET", "/v1/files", auth=None)
    call("GET", "/v1/files")
    call("GET", "/v1/files?purpose=batch&order=asc&limit=1")
    call("GET", f"/v1/files?after={file2}")
    call("GET", "/v1/files?limit=0")
    call("GET", "/v1/files?order=sideways")
    call("GET", "/v1/files?purpose=nothing")
    call("GET", f"/v1/files/{file1}", auth=None)
    call("GET", f"/v1/files/{file1}")
    call("GET", f"/v1/files/{file1}", auth="tight")
    call("GET", "/v1/files/file-000000000000000000000000")
    call("GET", f"/v1/files/{file1}/content", auth=None)
    call("GET", f"/v1/files/{file1}/content")
    call("GET", "/v1/files/file-000000000000000000000000/content")
    call("DELETE", f"/v1/files/{file2}", auth=None)
    call("DELETE", f"/v1/files/{file2}")
    call("DELETE", f"/v1/files/{file2}")
    call("GET", f"/v1/files/{file2}/content")

    # /v1/batches
    batch = {"input_file_id": file1, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    call("POST", "/v1/batches", auth=None, json=batch)
    call("POST", "/v1/batches", json={})
    call("POST", "/v1/batches", json={**batch, "completion_window": "1h"})
    call("POST", "/v1/batches", json={**batch, "endpoint": "/v1/embeddings"})
    call("POST", "/v1/batches", json={**batch, "input_file_id": "file-000000000000000000000000"})
    call("POST", "/v1/batches", json={**batch, "input_file_id": file2})
    call("POST", "/v1/batches", json={**batch, "unknown_field": 1})
    batch1 = _id(call("POST", "/v1/batches", json={**batch, "metadata": {"case": "one"}}))
    batch2 = _id(call("POST", "/v1/batches", json=batch))
    call("GET", "/v1/batches", auth=None)
    call("GET", "/v1/batches")
    call("GET", "/v1/batches?limit=1")
    call("GET", f"/v1/batches?after={batch2}")
    call("GET", "/v1/batches?limit=0")
    call("GET", f"/v1/batches/{batch1}", auth=None)
    call("GET", f"/v1/batches/{batch1}")
    call("GET", f"/v1/batches/{batch1}", auth="tight")
    call("GET", "/v1/batches/batch_000000000000000000000000")
    call("POST", f"/v1/batches/{batch1}/cancel", auth=None)
    call("POST", f"/v1/batches/{batch1}/cancel")
    call("POST", f"/v1/batches/{batch1}/cancel")
    call("POST", "/v1/batches/batch_000000000000000000000000/cancel")
    call("GET", f"/v1/batches/{batch1}")
    call("DELETE", f"/v1/files/{file1}")  # a batch's input

    # the state after it all
    call("GET", "/v1/jobs?limit=100")
    call("GET", "/v1/usage")
    call("GET", "/v1/webhooks")
    call("GET", "/v1/files")
    call("GET", "/readyz", auth=None)
    call("GET", "/metrics", auth=f"Bearer {METRICS_TOKEN}")


# -- record and check --------------------------------------------------------------------------------


_NUMBER_PLACEHOLDER = re.compile(r"(?<=[:\[,]) ?(<[a-z-]+(?::\d+)?>)")


def render(snapshot: dict[str, Any]) -> list[str]:
    """The snapshot as lines to diff: a request a block, a JSON body pretty-printed (its exact text
    is compared, and any difference the pretty form hides is shown raw)."""
    lines = ["## routes", *snapshot["routes"], "## requests"]
    for index, record in enumerate(snapshot["requests"]):
        lines.append(f"### {index} {record['request']} (auth: {record['auth']}) -> {record['status']}")
        lines += [f"{name}: {value}" for name, value in record["headers"].items()]
        body = record["body"]
        try:  # a placeholder in place of a number shown as a string
            pretty = json.dumps(
                json.loads(_NUMBER_PLACEHOLDER.sub(r'"\1 (number)"', body)), indent=1, ensure_ascii=False
            )
        except ValueError:
            pretty = body
        lines += pretty.splitlines() or [""]
    lines.append("## openapi")
    lines += snapshot["openapi"]
    return lines


def compare(expected: dict[str, Any], actual: dict[str, Any], context: int = 3, max_lines: int = 200) -> str:
    """'' when the snapshots are the same, else a unified diff of the first differences."""
    if expected == actual:
        return ""
    diff = list(
        difflib.unified_diff(
            render(expected), render(actual), "recorded (tests/data/route_snapshot.json)", "now", n=context, lineterm=""
        )
    )
    if not diff:  # only what the pretty form hides (whitespace, escapes): the raw texts
        for index, (old, new) in enumerate(zip(expected["requests"], actual["requests"], strict=False)):
            if old != new:
                diff += [f"request {index}:", f"- {json.dumps(old)}", f"+ {json.dumps(new)}"]
    if len(diff) > max_lines:
        diff = [*diff[:max_lines], f"... ({len(diff) - max_lines} more lines of diff)"]
    return "\n".join(diff)


def check(workdir: Path | None = None, redis_db: int | None = None, snapshot: Path = SNAPSHOT) -> str:
    expected = json.loads(snapshot.read_text())
    with _workdir(workdir) as directory:
        return compare(expected, take_snapshot(directory, redis_db))


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="ponder-route-snapshot-") as directory:
        yield Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.route_snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["record", "check"])
    parser.add_argument("--workdir", type=Path, help="for the database and files (default: a temporary directory)")
    parser.add_argument("--redis-db", type=int, help="default: PONDER_TEST_REDIS_DB (13) + 1; flushed")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(RUN_TIMEOUT_SECONDS, exit=True)  # a request that waits for a worker
    if args.command == "record":
        with _workdir(args.workdir) as directory:
            snapshot = take_snapshot(directory, args.redis_db)
        args.snapshot.parent.mkdir(parents=True, exist_ok=True)
        args.snapshot.write_text(json.dumps(snapshot, indent=1, ensure_ascii=False) + "\n")
        print(f"{len(snapshot['requests'])} requests over {len(snapshot['routes'])} routes: {args.snapshot}")
        return 0
    difference = check(args.workdir, args.redis_db, args.snapshot)
    if difference:
        print(difference)
        return 1
    print(f"the same as {args.snapshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
