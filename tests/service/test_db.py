"""Migrations bring an empty SQLite file and an empty PostgreSQL database to head, and the result
matches the tables the code declares; text columns keep what PostgreSQL's text type cannot."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel

import service.models  # noqa: F401
from service.db import current_revision, get_engine, upgrade
from service.models import ApiKey, Job, utcnow
from tests.stack import database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    with database(request.param, tmp_path) as url:
        yield url


def test_upgrade_to_head_matches_the_models(empty_database):
    upgrade(empty_database)
    assert current_revision(empty_database) == "0002"
    with get_engine(empty_database).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []
    upgrade(empty_database)  # a second run is a no-op
    assert current_revision(empty_database) == "0002"


def test_text_with_nul_and_escape_characters_round_trips(empty_database):
    upgrade(empty_database)
    tricky = "a\x00b\x1bc\x1b0d\x00\x00\\boxed{1}"
    with Session(get_engine(empty_database)) as session:
        key = ApiKey(name="t", prefix="p", key_hash="h" * 64)
        session.add(key)
        session.commit()
        job = Job(api_key_id=key.id, model="m", request={"prompt": "\x00"}, prompt_token_ids=[1], expires_at=utcnow())
        job.content = tricky
        session.add(job)
        session.commit()
        job_id = job.id
    with Session(get_engine(empty_database)) as session:
        stored = session.get(Job, job_id)
        assert stored.content == tricky
        assert stored.request == {"prompt": "\x00"}
