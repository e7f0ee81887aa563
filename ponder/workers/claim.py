"""A worker's claim on a job: one conditional UPDATE (queued -> running, or a running job whose
lease expired) takes it, and every later write to the job's row carries the claim in its WHERE
(`Claim.write`), so an attempt that lost the job writes nothing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, Update, or_, update
from sqlmodel import Session, col, select

from ponder.service.db import durable, sql_engine
from ponder.service.queue import enqueue_deliveries
from ponder.service.settings import Settings
from ponder.service.tables import Job, JobStatus, WebhookEvent, utcnow
from ponder.service.webhooks.deliveries import event_targets, record_job_event
from ponder.workers.job_picker import lapsed, ready
from ponder.workers.webhook_sender import hold_back


class LostClaim(Exception):
    """The job is no longer this attempt's: another worker claimed it, or it ended."""


@dataclass(frozen=True)
class Claim:
    """The fencing token of one attempt: its writes apply only while the row still says so."""

    job_id: uuid.UUID
    worker: str
    attempt: int

    @property
    def holds(self):
        """The WHERE clause of every write this attempt makes to its job's row."""
        return (
            (col(Job.id) == self.job_id)
            & (col(Job.status) == JobStatus.running)
            & (col(Job.worker) == self.worker)
            & (col(Job.attempts) == self.attempt)
        )

    @property
    def stream_owner(self) -> str:
        return f"{self.attempt}:{self.worker}"

    def write_alone(self, engine: Engine, **values) -> None:
        """This attempt's write when nothing goes with it in its transaction (`write_alone`), made
        durable (a final state); LostClaim when the job is no longer this attempt's. PostgreSQL
        locks the row only, so there it is an ordinary transaction, durable as `durable` makes it."""
        if engine.dialect.name != "sqlite":  # SQLite's commits are durable already (service/db.py)
            with Session(engine) as session:
                durable(session)
                self.write(session, **values)
                session.commit()
        elif not write_alone(engine, update(Job).where(self.holds).values(**values)):
            raise LostClaim(f"attempt {self.attempt} no longer holds the job's row")

    def write(self, session: Session, **values):
        """UPDATE the job's row under this claim; returns (cancel_requested, expires_at) as written,
        or raises LostClaim, having written nothing, when the job is no longer this attempt's."""
        returned = col(Job.cancel_requested), col(Job.expires_at)
        row = session.execute(update(Job).where(self.holds).values(**values).returning(*returned)).first()
        if row is None:
            session.rollback()
            raise LostClaim(f"attempt {self.attempt} no longer holds the job's row")
        return row


def claim_job(job_id: uuid.UUID, worker: str, settings: Settings) -> Job | None:
    now = utcnow()
    engine = sql_engine(settings, background=True)
    with Session(engine, expire_on_commit=False) as session:
        # Reads first: on SQLite the write lock is held from the UPDATE to the commit, not longer.
        owner = session.exec(select(Job.api_key_id).where(col(Job.id) == job_id)).first()
        listeners = event_targets(session, owner, None, WebhookEvent.started) if owner else []
        listeners = hold_back(listeners, owner, settings) if owner and listeners else listeners
        claiming = (
            update(Job)
            .where(col(Job.id) == job_id, or_(ready(now), lapsed(now)))
            .values(
                status=JobStatus.running,
                worker=worker,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                attempts=Job.attempts + 1,
                started_at=now,
                updated_at=now,
            )
        )
        if not listeners:  # nothing else to write with it: one statement that commits as it runs
            taken = write_alone(engine, claiming)
            mine = (col(Job.id) == job_id) & (col(Job.worker) == worker) & (col(Job.started_at) == now)
            return session.exec(select(Job).where(mine)).first() if taken else None
        claimed = session.scalars(claiming.returning(Job)).first()  # the claimed row in the same statement
        started = record_job_event(session, claimed, WebhookEvent.started, settings, listeners) if claimed else []
        session.commit()
    enqueue_deliveries(started)
    return claimed


def write_alone(engine: Engine, statement: Update) -> int:
    """Run one UPDATE that nothing else is written with, committed as it runs (autocommit); the
    rows it changed. On SQLite the database-wide write lock is then held inside SQLite's C call
    only: a transaction holds it from its first write to its commit, across every wait of its
    thread for the GIL or a CPU in between, and on a busy machine those waits (not the SQL) kept
    it held, while the API's inserts queued behind it
    (docs/benchmarks.md#sqlites-write-lock-under-load-issue-24-item-12-2026-12-06)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        return connection.execute(statement).rowcount
