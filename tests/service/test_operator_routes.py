"""The operators' routes of the real app (create_app, its lifespan, a real Redis and SQLite):
/metrics behind PONDER_METRICS_TOKEN and counting the database at most once per
PONDER_METRICS_CACHE_SECONDS, /readyz naming a failing dependency without its exception text (which
goes to the log), and /docs, /redoc, /openapi.json off in production unless asked for."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from ponder.api.app import create_app
from ponder.api.routes import metrics as metrics_api
from ponder.service.db import database_engine, upgrade
from ponder.service.security import create_api_key
from ponder.service.settings import Settings, get_settings
from ponder.service.tables import Job, utcnow
from tests.stack import start_redis

REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1


@pytest.fixture
def environment(monkeypatch):
    """set(**settings) -> the app built on them (PONDER_<NAME> variables)."""

    def set_settings(**values: str):
        for name, value in values.items():
            monkeypatch.setenv(f"PONDER_{name.upper()}", value)
        monkeypatch.setenv("PONDER_MODEL", "tiny-llama")
        get_settings.cache_clear()
        database_engine.cache_clear()  # database_engine() is cached for the URL the settings had
        return create_app()

    yield set_settings
    get_settings.cache_clear()
    database_engine.cache_clear()


@pytest.fixture
def database_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(url)
    return url


def test_metrics_ask_for_the_token_when_one_is_set(environment, database_url, tmp_path):
    redis_url, process = start_redis(tmp_path, db=REDIS_DB)
    try:
        app = environment(metrics_token="scrape-secret", database_url=database_url, redis_url=redis_url)
        with TestClient(app) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2NyYXBlLXNlY3JldA=="}):
                response = client.get("/metrics", headers=headers)
                assert response.status_code == 401, headers
                assert response.json()["error"]["type"] == "authentication_error"
                assert response.headers["www-authenticate"] == "Bearer"
            response = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
            assert response.status_code == 200 and "ponder_jobs{" in response.text
    finally:
        if process is not None:
            process.kill()


def test_metrics_without_a_token_are_open(environment, database_url, tmp_path):
    redis_url, process = start_redis(tmp_path, db=REDIS_DB)
    try:
        app = environment(database_url=database_url, redis_url=redis_url)
        with TestClient(app) as client:
            assert client.get("/metrics").status_code == 200
    finally:
        if process is not None:
            process.kill()


def test_metrics_count_the_database_once_per_cache_period(environment, database_url, tmp_path, monkeypatch):
    redis_url, process = start_redis(tmp_path, db=REDIS_DB)
    monkeypatch.setattr(metrics_api._database, "computed_at", -math.inf)  # another test's numbers: stale
    queries: list[str] = []

    def count_jobs_queries(conn, cursor, statement, parameters, context, executemany):
        if "FROM jobs" in statement:
            queries.append(statement)

    engine = database_engine(database_url)
    sa.event.listen(sa.Engine, "before_cursor_execute", count_jobs_queries)  # every engine: the app has its own
    try:
        app = environment(database_url=database_url, redis_url=redis_url, metrics_cache_seconds="3600")
        with TestClient(app) as client:
            first = client.get("/metrics").text
            per_scrape = len(queries)
            assert per_scrape > 0 and 'ponder_jobs{status="queued"} 0.0' in first
            _add_queued_job(engine)
            for _ in range(5):
                assert 'ponder_jobs{status="queued"} 0.0' in client.get("/metrics").text  # cached
            assert len(queries) == per_scrape
            monkeypatch.setattr(metrics_api._database, "computed_at", -math.inf)  # the period is over
            assert 'ponder_jobs{status="queued"} 1.0' in client.get("/metrics").text
            assert len(queries) == 2 * per_scrape
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", count_jobs_queries)
        if process is not None:
            process.kill()


def _add_queued_job(engine) -> None:
    with Session(engine) as session:
        key, _ = create_api_key(session, "metrics")
        session.add(
            Job(
                api_key_id=key.id, model="m", request={}, prompt_token_ids=[1], expires_at=utcnow() + timedelta(hours=1)
            )
        )
        session.commit()


def test_readyz_names_what_is_down_without_its_exception(environment, caplog):
    """Nothing listens on port 1: the database and Redis both fail; the answer says which, the log
    says why."""
    app = environment(
        database_url="postgresql+psycopg://ponder:hunter2@127.0.0.1:1/secretdb", redis_url="redis://127.0.0.1:1/0"
    )
    with caplog.at_level(logging.ERROR, logger="ponder.api"), TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body == {
        "status": "not ready",
        "checks": {"database": "error: unavailable", "redis": "error: unavailable", "inference_workers": 0},
    }
    assert "secretdb" not in response.text and "127.0.0.1" not in response.text
    assert "readyz: the database did not answer" in caplog.text and "readyz: Redis did not answer" in caplog.text
    assert "127.0.0.1" in caplog.text  # the detail is in the log


@pytest.mark.parametrize(
    ("values", "served"),
    [
        ({"environment": "production", "secret_key": "s" * 32, "metrics_token": "t"}, False),
        ({"environment": "production", "secret_key": "s" * 32, "metrics_token": "t", "docs_enabled": "true"}, True),
        ({"environment": "development"}, True),
        ({"environment": "development", "docs_enabled": "false"}, False),
    ],
)
def test_docs_are_off_in_production_unless_asked_for(environment, values, served):
    client = TestClient(environment(**values))  # no lifespan: these routes need nothing
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == (200 if served else 404), path
    assert client.get("/healthz").status_code == 200


def test_production_api_refuses_to_start_with_public_metrics(tmp_path):
    """/metrics has no API key: in production it was public unless someone remembered the token."""
    production = {"environment": "production", "secret_key": "s" * 32, "model": "tiny-llama"}
    with pytest.raises(ValueError, match="PONDER_METRICS_TOKEN is unset in production"):
        create_app(Settings(_env_file=None, **production))
    create_app(Settings(_env_file=None, **production, metrics_token="scrape-secret"))
    create_app(Settings(_env_file=None, **production, metrics_enabled=False))
    env = {**os.environ, **{f"PONDER_{k.upper()}": v for k, v in production.items()}}
    env["PONDER_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "ponder", "api"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "PONDER_METRICS_TOKEN is unset in production" in result.stderr
    assert "Traceback" not in result.stderr


def test_readyz_checks_at_most_once_a_second_however_often_it_is_asked(environment, database_url, tmp_path):
    """Public and polled by every balancer, it pinged the database and scanned Redis' keys on each
    call, on a thread of the requests in flight."""
    pings: list[str] = []

    def count_pings(conn, cursor, statement, *args) -> None:
        if statement.strip().upper() == "SELECT 1":
            pings.append(statement)

    redis_url, process = start_redis(tmp_path, db=REDIS_DB)
    sa.event.listen(sa.Engine, "before_cursor_execute", count_pings)
    try:
        app = environment(database_url=database_url, redis_url=redis_url)
        with TestClient(app) as client:
            answers = [client.get("/readyz") for _ in range(30)]
            assert {a.json()["checks"]["database"] for a in answers} == {"ok"}
            assert len(pings) == 1
            time.sleep(1.1)
            client.get("/readyz")
            assert len(pings) == 2
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", count_pings)
        if process is not None:
            process.kill()
