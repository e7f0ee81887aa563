"""On SQLite a transaction holds the database-wide write lock from its first write to its commit,
and on a busy machine the thread holding it waits for the GIL or a CPU in between: the inference
worker's claims and results held the lock ~90% of the time under 100 jobs/s, and the API's inserts
queued behind them
(docs/benchmarks.md#sqlites-write-lock-under-load-issue-24-item-12-2026-12-06). A claim and a
result that nothing else is written with are now one statement each, committed as it runs: right
after it returns, another connection can take the write lock at once. A real SQLite file and the
worker's own functions."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import event

from ponder.service.db import sql_engine
from ponder.service.tables import JobStatus
from ponder.workers import job_runner
from ponder.workers.claim import Claim, claim_job
from tests.workers.test_fencing import finished_output, queued_job, row


def lock_is_free(path: str) -> bool:
    """Whether another connection can take the write lock right now (without waiting)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
def test_a_claim_and_a_result_hold_the_write_lock_inside_their_statement_only(settings):
    path = settings.database_url.split(":///", 1)[1]
    seen: list[tuple[str, bool]] = []

    def after_write(_conn, _cursor, statement, *_args) -> None:  # Python again, the statement done
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            seen.append((statement.split("SET", 1)[1][:20], lock_is_free(path)))

    engine = sql_engine(settings, background=True)
    event.listen(engine, "after_cursor_execute", after_write)
    try:
        job = claim_job(queued_job(settings), "w1", settings)
        assert job is not None and job.status == JobStatus.running and job.attempts == 1
        job_runner._finish(job, Claim(job.id, "w1", job.attempts), finished_output("done"), settings)
    finally:
        event.remove(engine, "after_cursor_execute", after_write)
    assert row(settings, job.id).status == JobStatus.succeeded and row(settings, job.id).content == "done"
    assert len(seen) == 2 and all(free for _, free in seen), seen  # the claim, then the result
