"""Requests the fuzzer (tests/service/test_fuzz_api.py, benchmarks/fuzz_api.py) found answering
500, each now a clear 4xx in the API's error shape: the real app (create_app and its lifespan),
SQLite, the machine's Redis."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from ponder.api.app import create_app
from ponder.service.db import database_engine, upgrade
from ponder.service.security import create_api_key
from ponder.service.settings import get_settings
from tests.stack import start_redis

REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1


@pytest.fixture
def client(monkeypatch, tmp_path):
    """A client of the app with a real API key."""
    redis_url, redis_process = start_redis(tmp_path, db=REDIS_DB)
    database_url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(database_url)
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MODEL": "tiny-llama",
        "FILES_DIR": str(tmp_path / "files"),
    }.items():
        monkeypatch.setenv(f"PONDER_{name}", value)
    get_settings.cache_clear()
    database_engine.cache_clear()
    with Session(database_engine(database_url)) as session:
        _, key = create_api_key(session, "regressions")
    try:
        with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as client:
            yield client
    finally:
        get_settings.cache_clear()
        database_engine.cache_clear()
        if redis_process is not None:
            redis_process.kill()


def assert_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "param", "code"} and error["param"] == param, error
    return error


def test_a_last_event_id_past_redis_range_is_a_422(client):
    """20 digits match the Last-Event-ID pattern but can exceed 2**64 - 1, which Redis' XREAD
    refused after the stream had started (500)."""
    job = client.post("/v1/jobs", json={"prompt": "2 + 2?"}).json()
    for last_event_id in ("99999999999999999999-0", "0-18446744073709551616"):
        response = client.get(f"/v1/jobs/{job['id']}/stream", headers={"Last-Event-ID": last_event_id})
        error = assert_error(response, 422, "last-event-id")
        assert "at most 18446744073709551615" in error["message"]
