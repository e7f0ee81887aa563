"""Migrations bring an empty SQLite file and an empty PostgreSQL database to head, and the result
matches the tables the code declares; rows written before a migration keep working after it; text
columns keep what PostgreSQL's text type cannot; a job's row is what its API response shows."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel

import ponder.service.tables  # noqa: F401
from ponder.service.db import current_revision, database_engine, upgrade
from ponder.service.job_public import JobPublic
from ponder.service.tables import ApiKey, Job, utcnow
from tests.stack import database

HEAD = "0014"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    with database(request.param, tmp_path) as url:
        yield url


def test_upgrade_to_head_matches_the_models(empty_database):
    upgrade(empty_database)
    assert current_revision(empty_database) == HEAD
    with database_engine(empty_database).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []
    upgrade(empty_database)  # a second run is a no-op
    assert current_revision(empty_database) == HEAD


def test_jobs_from_before_speculative_decoding_count_no_drafts(empty_database):
    upgrade(empty_database, "0002")
    ids = {"key": uuid.uuid4().hex, "job": uuid.uuid4().hex}
    with database_engine(empty_database).begin() as connection:  # rows as the previous code wrote them
        for statement in _ROWS_AT_0002:
            connection.execute(sa.text(statement), ids)
    upgrade(empty_database)
    with Session(database_engine(empty_database)) as session:
        job = session.get_one(Job, uuid.UUID(ids["job"]))
    assert (job.draft_tokens, job.accepted_draft_tokens, job.draft_acceptance_rate) == (0, 0, None)


# Every NOT NULL column of revision 0002's api_keys and jobs, in SQL both databases accept.
_ROWS_AT_0002 = [
    "INSERT INTO api_keys (id, name, prefix, key_hash, created_at) VALUES (:key, 'k', 'p', 'h', '2026-11-30 00:00:00')",
    """INSERT INTO jobs (id, api_key_id, status, priority, model, request, prompt_token_ids, metadata, attempts,
        cancel_requested, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, max_batch_size,
        created_at, expires_at, updated_at)
    VALUES (:job, :key, 'succeeded', 0, 'm', '{}', '[1]', '{}', 1, false, 1, 0, 1, 0, 1,
        '2026-11-30 00:00:00', '2026-11-30 00:00:00', '2026-11-30 00:00:00')""",
]


@pytest.mark.parametrize(("drafted", "accepted", "rate"), [(0, 0, None), (8, 6, 0.75)])
def test_a_jobs_usage_shows_its_draft_tokens(empty_database, drafted, accepted, rate):
    upgrade(empty_database)
    with Session(database_engine(empty_database), expire_on_commit=False) as session:
        key = ApiKey(name="t", prefix="p", key_hash="h" * 64)
        job = Job(api_key_id=key.id, model="m", request={"max_tokens": 9}, prompt_token_ids=[1], expires_at=utcnow())
        job.draft_tokens, job.accepted_draft_tokens = drafted, accepted
        session.add_all([key, job])
        session.commit()
    with Session(database_engine(empty_database)) as session:
        usage = JobPublic.model_validate(session.get_one(Job, job.id)).usage
    assert (usage.draft_tokens, usage.accepted_draft_tokens, usage.draft_acceptance_rate) == (drafted, accepted, rate)


def test_text_with_nul_and_escape_characters_round_trips(empty_database):
    upgrade(empty_database)
    tricky = "a\x00b\x1bc\x1b0d\x00\x00\\boxed{1}"
    with Session(database_engine(empty_database)) as session:
        key = ApiKey(name="t", prefix="p", key_hash="h" * 64)
        session.add(key)
        session.commit()
        job = Job(api_key_id=key.id, model="m", request={"prompt": "\x00"}, prompt_token_ids=[1], expires_at=utcnow())
        job.content = tricky
        session.add(job)
        session.commit()
        job_id = job.id
    with Session(database_engine(empty_database)) as session:
        stored = session.get(Job, job_id)
        assert stored.content == tricky
        assert stored.request == {"prompt": "\x00"}
