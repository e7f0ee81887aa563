"""A worker's claim on a job: one conditional UPDATE (queued -> running, or a running job whose
lease expired) takes it, and every later write to the job's row carries the claim in its WHERE
(`Claim.write`), so an attempt that lost the job writes nothing."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from ponder.service.db import sql_engine
from ponder.service.queue import enqueue_deliveries
from ponder.service.settings import Settings
from ponder.service.tables import Job, JobStatus, WebhookEvent, utcnow
from ponder.service.webhooks.deliveries import event_targets, record_job_event
from ponder.workers.job_picker import lapsed, ready


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
    with Session(sql_engine(settings, background=True), expire_on_commit=False) as session:
        # Reads first: on SQLite the write lock is held from the UPDATE to the commit, not longer.
        owner = session.exec(select(Job.api_key_id).where(col(Job.id) == job_id)).first()
        listeners = event_targets(session, owner, None, WebhookEvent.started) if owner else []
        claimed = session.scalars(
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
            .returning(Job)  # the claimed row in the same statement
        ).first()
        started = record_job_event(session, claimed, WebhookEvent.started, settings, listeners) if claimed else []
        session.commit()
    enqueue_deliveries(started)
    return claimed
