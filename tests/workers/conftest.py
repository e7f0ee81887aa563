"""Worker-side tests run on real databases (SQLite and PostgreSQL) and a real Redis."""

from __future__ import annotations

import os

import pytest

from ponder.service.db import database_engine, sql_engine, upgrade
from ponder.service.queue import celery_client
from ponder.service.settings import Settings, get_settings
from tests.stack import database, start_redis


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path, monkeypatch):
    # A Redis database of its own: never the e2e stack's (13), which this session may still use.
    redis_url, process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) - 1)
    with database(request.param, tmp_path) as url:
        upgrade(url)
        monkeypatch.setenv("PONDER_DATA_DIR", str(tmp_path))  # batch files among them: this test's only
        monkeypatch.setenv("PONDER_DATABASE_URL", url)
        monkeypatch.setenv("PONDER_REDIS_URL", redis_url)
        get_settings.cache_clear()  # Celery's sending app is made from the environment's settings:
        celery_client.cache_clear()  # messages go to this test's Redis
        settings = Settings()
        yield settings
        sql_engine(settings, background=True).dispose()
        get_settings.cache_clear()
        database_engine.cache_clear()
    if process is not None:
        process.terminate()
