"""Maintenance run by `ponder beat`: give back jobs whose worker vanished, send jobs whose message
was lost, expire jobs past their deadline, and erase old jobs' prompts and outputs (retention).
The database row is the source of truth; Redis only carries work, so all of this is safe to repeat."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import func, update
from sqlmodel import Session, col, select

from ponder.service.db import checkpoint, durable, sql_engine
from ponder.service.queue import enqueue_deliveries, enqueue_job, waiting_job_messages
from ponder.service.retention import erase_jobs, not_erased
from ponder.service.settings import Settings
from ponder.service.tables import FINAL_STATUSES, Job, JobStatus, utcnow
from ponder.service.webhooks.deliveries import record_final_event

logger = logging.getLogger("ponder.maintenance")


def requeue_expired_leases(
    settings: Settings, worker_alive: Callable[[str | None], bool], end_streams: Callable[[list], None]
) -> dict[str, int]:
    """Running jobs whose lease ran out go back to the queue, or, when a cancel was asked (a queued
    job with it is never claimed), end `cancelled` at once with the output they had flushed; queued
    jobs untouched for a while are sent again (the message may be lost).

    The attempt budget is for faults of the job itself: a lapse whose worker is gone (it may have
    been the job that killed it) counts, and the job fails at max_attempts such faults; a lapse
    whose worker still beats (a pause, a database or broker outage) does not. The streams of the jobs
    it ends are ended too (`end_streams`: they expire as a worker's own end has them expire)."""
    now = utcnow()
    requeued = failed = cancelled = resent = 0
    deliveries = []
    with Session(sql_engine(settings, background=True)) as session:
        durable(session)  # jobs ended here, with their webhooks
        stale = session.exec(
            select(Job).where(col(Job.status) == JobStatus.running, col(Job.lease_expires_at) < now)
        ).all()
        for job in stale:
            if job.cancel_requested:
                if _set_if_unchanged(session, job, JobStatus.cancelled):
                    cancelled += 1
                    deliveries += record_final_event(session, job.id, settings)
                continue
            faults = job.faults + (not worker_alive(job.worker))
            if faults >= settings.max_attempts:
                error = f"its worker was lost {faults} times (max_attempts)"
                if _set_if_unchanged(session, job, JobStatus.failed, error=error, faults=faults):
                    failed += 1
                    deliveries += record_final_event(session, job.id, settings)
            else:
                requeued += _set_if_unchanged(session, job, JobStatus.queued, faults=faults)
        waiting = _messages_to_resend(session, settings, now)
        for job_id, _ in waiting:
            session.exec(update(Job).where(col(Job.id) == job_id).values(updated_at=now))
            resent += 1
        session.commit()
        to_send = [(job.id, job.batch_id) for job in stale if job.status == JobStatus.queued] + list(waiting)
    for job_id, batch_id in to_send:
        enqueue_job(str(job_id), batch=batch_id is not None)  # a batch's job stays behind direct ones
    enqueue_deliveries(deliveries)
    _best_effort(end_streams, [job.id for job in stale if job.status in (JobStatus.cancelled, JobStatus.failed)])
    checkpoint(sql_engine(settings, background=True))  # SQLite: the API's connections leave checkpoints to us
    return {"requeued": requeued, "failed": failed, "cancelled": cancelled, "resent": resent}


def _messages_to_resend(session: Session, settings: Settings, now: datetime) -> list[tuple[Any, str | None]]:
    """Queued jobs untouched for resend_queued_after_seconds whose message may be lost. With the
    fair pick a message stands for a slot, not for its job, so only the shortfall is sent: queued
    jobs beyond the messages waiting in the broker (else a long queue would have every job's
    message sent again each round: a 50,000-line batch, 50,000 messages). First come first
    served needs each job's own message: all of them are sent again."""
    stale = (col(Job.status) == JobStatus.queued) & (
        col(Job.updated_at) < now - timedelta(seconds=settings.resend_queued_after_seconds)
    )
    oldest_first = select(Job.id, Job.batch_id).where(stale).order_by(col(Job.created_at))
    if not settings.fair_scheduling:
        return list(session.exec(oldest_first).all())
    queued = session.exec(select(func.count()).where(col(Job.status) == JobStatus.queued)).one()
    shortfall = queued - waiting_job_messages()
    return list(session.exec(oldest_first.limit(shortfall)).all()) if shortfall > 0 else []


def _set_if_unchanged(session: Session, job: Job, status: JobStatus, error: str | None = None, **changes: Any) -> int:
    """Move a job on only if nobody renewed its lease meanwhile (a worker may still be alive)."""
    values: dict[str, Any] = {"status": status, "worker": None, "lease_expires_at": None, "updated_at": utcnow()}
    values |= changes
    if status != JobStatus.queued:
        values |= {"error": error, "finished_at": utcnow()}
    if status == JobStatus.cancelled:
        values["finish_reason"] = "abort"  # as when its worker stops it: the output so far stays
    result = session.exec(
        update(Job)
        .where(col(Job.id) == job.id, col(Job.status) == JobStatus.running)
        .where(col(Job.lease_expires_at) == job.lease_expires_at)
        .values(**values)
    )
    if result.rowcount:
        job.status = status
    return result.rowcount


def expire_jobs(publish_cancel, settings: Settings, end_streams: Callable[[list], None]) -> dict[str, int]:
    """Queued jobs past their deadline expire now (a stream an earlier attempt left ends with them);
    running ones are told to stop (their worker records them as expired)."""
    now = utcnow()
    with Session(sql_engine(settings, background=True)) as session:
        durable(session)  # jobs ended here, with their webhooks
        expired = session.scalars(
            update(Job)
            .where(col(Job.status) == JobStatus.queued, col(Job.expires_at) <= now)
            .values(status=JobStatus.expired, finished_at=now, updated_at=now)
            .returning(col(Job.id))
        ).all()
        deliveries = [d for job_id in expired for d in record_final_event(session, job_id, settings)]
        running = session.exec(
            select(Job.id).where(
                col(Job.status) == JobStatus.running, col(Job.expires_at) <= now, ~col(Job.cancel_requested)
            )
        ).all()
        if running:
            session.exec(update(Job).where(col(Job.id).in_(running)).values(cancel_requested=True, updated_at=now))
        session.commit()
    enqueue_deliveries(deliveries)
    _best_effort(end_streams, list(expired))
    for job_id in running:
        publish_cancel(str(job_id))
    return {"expired": len(expired), "stopping": len(running)}


def _best_effort(end_streams: Callable[[list], None], job_ids: list) -> None:
    """After the commit: Redis being away fails no maintenance (every stream expires by itself
    anyway, ponder/workers/job_stream.py)."""
    if not job_ids:
        return
    try:
        end_streams(job_ids)
    except RedisError as e:
        logger.warning("the streams of %d ended jobs keep their longer expiry: Redis error (%s)", len(job_ids), e)


PURGE_CHUNK = 500  # jobs erased per transaction: a long backlog never holds one long lock


def purge_old_jobs(settings: Settings, delete_streams: Callable[[list], None]) -> dict[str, int]:
    """Retention: erase the prompts and outputs of jobs that finished more than
    `retention_days` ago (ponder/service/retention.py; usage stays), a chunk per transaction, then their
    streams. Nothing when retention_days is 0. Idempotent: erased jobs are not selected again."""
    if not settings.retention_days:
        return {"erased": 0}
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    erased = 0
    while True:
        with Session(sql_engine(settings, background=True)) as session:
            job_ids = session.exec(
                select(Job.id)
                .where(col(Job.status).in_(FINAL_STATUSES), col(Job.finished_at) < cutoff, not_erased())
                .limit(PURGE_CHUNK)
            ).all()
            done = erase_jobs(session, job_ids)
            session.commit()
        delete_streams(done)
        erased += len(done)
        if len(job_ids) < PURGE_CHUNK:
            return {"erased": erased}
