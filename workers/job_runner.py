"""Running one job on this worker: claim it, hand it to the engine host, stream and persist what
comes back, write the result. Plain functions; the Celery task is a thin adapter around them.

The claim is one conditional UPDATE (queued -> running, or a running job whose lease expired), so
a duplicate delivery of a job whose lease is live changes nothing and is skipped.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from engine.outputs import RequestMetrics, RequestOutput
from service.db import worker_engine
from service.models import Job, JobStatus, WebhookEvent, utcnow
from service.queue import enqueue_deliveries
from service.schemas import JobCreate
from service.settings import Settings
from service.streams import stream_key
from service.webhooks.deliveries import EVENT_OF_STATUS, event_targets, record_final_event, record_job_event
from workers.engine_host import EngineHost

logger = logging.getLogger("ponder.worker")


def claim_job(job_id: uuid.UUID, worker: str, settings: Settings) -> Job | None:
    now = utcnow()
    claimable = or_(
        (col(Job.status) == JobStatus.queued) & ~col(Job.cancel_requested),
        (col(Job.status) == JobStatus.running) & (col(Job.lease_expires_at) < now),
    )
    with Session(worker_engine(), expire_on_commit=False) as session:
        # Reads first: on SQLite the write lock is held from the UPDATE to the commit, not longer.
        owner = session.exec(select(Job.api_key_id).where(col(Job.id) == job_id)).first()
        listeners = event_targets(session, owner, None, WebhookEvent.started) if owner else []
        claimed = session.scalars(
            update(Job)
            .where(col(Job.id) == job_id, claimable, col(Job.expires_at) > now)
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


@dataclass
class GeneratedSoFar:
    """What the engine has sent back for the job so far (the last output ends it)."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    max_batch_size: int = 0
    first_token_at: datetime | None = None
    final: RequestOutput | None = None


def run_job(job_id: uuid.UUID, host: EngineHost, settings: Settings, worker: str, redis) -> str:
    """Run the job if this worker can claim it. Returns what happened, for the logs."""
    job = claim_job(job_id, worker, settings)
    if job is None:
        return "skipped (not claimable: running elsewhere, finished, cancelled or expired)"
    key = stream_key(job.id)
    if job.attempts > 1:  # a retry starts the stream over
        redis.delete(key)
        redis.xadd(key, {"type": "reset"})
    params = JobCreate.from_stored(job.request).sampling_params(job.request["max_tokens"])
    handle = host.submit(str(job.id), job.prompt_token_ids, params)
    generated = GeneratedSoFar()
    next_flush = time.monotonic() + settings.progress_interval_seconds
    while generated.final is None:
        event = handle.get(timeout=0.25)
        if event is not None and event.error is not None:
            _fail(job.id, f"{type(event.error).__name__}: {event.error}", settings)
            _end_stream(redis, key, settings)
            return "failed"
        if event is not None:
            assert event.output is not None  # only an error event comes without an output (EngineHost)
            _record(generated, event.output, event.batch_size, redis, key)
        if time.monotonic() >= next_flush and generated.final is None:
            if _flush_progress(job.id, generated, settings):  # True: cancel asked or deadline passed
                host.abort(str(job.id))
            next_flush = time.monotonic() + settings.progress_interval_seconds
    status = _finish(job, generated, settings)
    _end_stream(redis, key, settings)
    return status


def _record(generated: GeneratedSoFar, output: RequestOutput, batch_size: int, redis, key: str) -> None:
    generated.max_batch_size = max(generated.max_batch_size, batch_size)
    if output.new_token_ids and generated.first_token_at is None:
        generated.first_token_at = utcnow()
    generated.completion_tokens += len(output.new_token_ids)
    generated.reasoning.append(output.delta_reasoning)
    generated.content.append(output.delta_content)
    pipe = redis.pipeline(transaction=False)
    if output.delta_reasoning:
        pipe.xadd(key, {"type": "reasoning", "delta": output.delta_reasoning})
    if output.delta_content:
        pipe.xadd(key, {"type": "content", "delta": output.delta_content})
    pipe.execute()
    if output.finished:
        generated.final = output


def _flush_progress(job_id: uuid.UUID, generated: GeneratedSoFar, settings: Settings) -> bool:
    """Persist partial output and renew the lease; returns True when the job must stop now."""
    now = utcnow()
    with Session(worker_engine()) as session:
        session.exec(
            update(Job)
            .where(col(Job.id) == job_id)
            .values(
                content="".join(generated.content),
                reasoning_content="".join(generated.reasoning),
                completion_tokens=generated.completion_tokens,
                max_batch_size=generated.max_batch_size,
                first_token_at=generated.first_token_at,
                lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                updated_at=now,
            )
        )
        session.commit()
        job = session.get(Job, job_id)
        return job is None or job.cancel_requested or job.expires_at <= now


def _finish(job: Job, generated: GeneratedSoFar, settings: Settings) -> str:
    """Write the result and its webhook deliveries in one transaction; send them after it."""
    output = generated.final
    assert output is not None  # run_job finishes a job only once its last output came
    now = utcnow()
    if output.finish_reason == "abort":  # stopped: by a cancel, or by the deadline
        status = JobStatus.expired if job.expires_at <= now else JobStatus.cancelled
    else:
        status = JobStatus.succeeded
    with Session(worker_engine()) as session:
        targets = event_targets(session, job.api_key_id, job.webhook_url, EVENT_OF_STATUS[status])  # before writing
        session.exec(
            update(Job)
            .where(col(Job.id) == job.id)
            .values(
                status=status,
                content=output.content,
                reasoning_content=output.reasoning_content,
                answer=output.answer,
                finish_reason=output.finish_reason,
                cached_tokens=output.usage.cached_tokens,
                completion_tokens=output.usage.completion_tokens,
                reasoning_tokens=output.usage.reasoning_tokens,
                **_draft_usage(output.metrics),
                max_batch_size=generated.max_batch_size,
                first_token_at=generated.first_token_at,
                finished_at=now,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        deliveries = record_final_event(session, job.id, settings, targets)
        session.commit()
    enqueue_deliveries(deliveries)
    return str(status)


def _draft_usage(metrics: RequestMetrics | None) -> dict[str, int]:
    """The job's speculative-decoding counts, as Job columns. An output without metrics has none
    to report: the columns keep their defaults (a retried job never wrote them before its end)."""
    if metrics is None:
        return {}
    return {"draft_tokens": metrics.num_draft_tokens, "accepted_draft_tokens": metrics.num_accepted_tokens}


def _fail(job_id: uuid.UUID, error: str, settings: Settings) -> None:
    now = utcnow()
    with Session(worker_engine()) as session:
        session.exec(
            update(Job)
            .where(col(Job.id) == job_id)
            .values(status=JobStatus.failed, error=error, finished_at=now, lease_expires_at=None, updated_at=now)
        )
        deliveries = record_final_event(session, job_id, settings)
        session.commit()
    enqueue_deliveries(deliveries)


def _end_stream(redis, key: str, settings: Settings) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, {"type": "done"})
    pipe.expire(key, settings.stream_ttl_seconds)
    pipe.execute()
