"""A job's writes wait out a PostgreSQL restart with their claim, on a private PostgreSQL the test
stops and starts (tests/private_postgres.py): a 0.4 s clean restart aborted every running attempt
("OperationalError: the database system is starting up"), and those jobs sat `running` until their
leases lapsed."""

from __future__ import annotations

import os
import threading
import time
from functools import partial

import pytest
import sqlalchemy
from sqlmodel import Session

from ponder.service.db import database_engine, upgrade
from ponder.service.settings import Settings
from ponder.service.tables import JobStatus
from ponder.workers import job_runner
from ponder.workers.job_runner import GeneratedSoFar
from ponder.workers.outages import patiently
from tests.private_postgres import private_postgres
from tests.stack import start_redis
from tests.workers.test_fencing import claimed, finished_output, queued_job, row


@pytest.fixture
def restartable(tmp_path):
    """(settings on a private PostgreSQL, the server, a Redis client)."""
    import redis as redis_lib

    redis_url, process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) - 1)
    with private_postgres() as server:
        url = server.url.replace("postgresql://", "postgresql+psycopg://")
        upgrade(url)
        settings = Settings(_env_file=None, database_url=url, redis_url=redis_url, lease_seconds=30)
        yield settings, server, redis_lib.Redis.from_url(redis_url, decode_responses=True)
        database_engine.cache_clear()
    if process is not None:
        process.terminate()


def away_for(server, seconds: float) -> threading.Thread:
    """Stops the server now (a clean shutdown) and starts it `seconds` later, in the background."""
    server.stop("fast")

    def come_back() -> None:
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=come_back)
    thread.start()
    return thread


def test_a_jobs_writes_wait_out_a_restart_with_their_claim(restartable):
    settings, server, redis = restartable
    job_id = queued_job(settings)
    job, claim, _ = claimed(settings, redis, job_id, "worker-a")
    progress = partial(
        job_runner._flush_progress, claim, GeneratedSoFar(content=["half"], completion_tokens=2), settings
    )

    back = away_for(server, 1.5)
    with pytest.raises(sqlalchemy.exc.OperationalError):  # as the attempt's writes were made before
        progress()
    assert patiently(progress, settings, "flushing progress") is False  # written once it is back
    back.join()
    assert row(settings, job_id).content == "half"

    back = away_for(server, 1.5)
    done = partial(job_runner._finish, job, claim, finished_output("the answer"), settings)
    assert patiently(done, settings, "writing the result") == "succeeded"
    back.join()
    final = row(settings, job_id)
    assert (final.status, final.content, final.worker, final.attempts) == (
        JobStatus.succeeded,
        "the answer",
        "worker-a",
        1,
    )


def test_a_crash_loses_no_result_that_was_reported(restartable):
    """`pg_ctl stop -m immediate` (no checkpoint; recovery replays the WAL) right after a final
    write: what that write said is there after the recovery."""
    settings, server, redis = restartable
    job_id = queued_job(settings)
    job, claim, _ = claimed(settings, redis, job_id, "worker-a")
    assert job_runner._finish(job, claim, finished_output("kept"), settings) == "succeeded"
    server.stop("immediate")
    server.start()
    database_engine.cache_clear()
    with Session(database_engine(settings.database_url)) as session:
        session.connection()  # the server answers again
    final = row(settings, job_id)
    assert (final.status, final.content) == (JobStatus.succeeded, "kept")
