"""Worker-side tests run on real databases (SQLite and PostgreSQL) and a real Redis."""

from __future__ import annotations

import os

import pytest

from ponder.service.db import sql_engine, upgrade
from ponder.service.queue import celery_client
from ponder.service.settings import Settings, get_settings
from ponder.service.streams import _sync_redis
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
        get_settings.cache_clear()
        _sync_redis.cache_clear()
        sql_engine.cache_clear()  # the workers' engine, sql_engine(None, background=True), follows the settings
        celery_client.cache_clear()  # messages go to this test's Redis
        yield Settings()
        sql_engine(None, background=True).dispose()
        get_settings.cache_clear()
        sql_engine.cache_clear()
    if process is not None:
        process.terminate()
