"""Job operations behind the REST API: create (validate, tokenize, store, then enqueue), look up,
list, cancel, usage. Route handlers stay thin; these functions hold the rules."""

from __future__ import annotations

import base64
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from ponder.service.errors import Conflict, InvalidRequest, NotFound
from ponder.service.job_public import UsageRow
from ponder.service.prompts import PreparedPrompt, prepare_prompt
from ponder.service.queue import publisher, revoke_job
from ponder.service.rate_limits import RateLimitCharge, settle
from ponder.service.retention import erase_jobs
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Job, JobStatus, utcnow
from ponder.service.webhooks.deliveries import record_final_event
from ponder.service.webhooks.endpoints import check_webhook_url

logger = logging.getLogger("ponder.api")


def create_job(
    session: Session,
    key: ApiKey,
    body: JobCreate,
    settings: Settings,
    idempotency_key: str | None = None,
    prepared: PreparedPrompt | None = None,
    openai_response: dict | None = None,
    charge: RateLimitCharge | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key returns the first job, not a new one.
    `prepared`: what `prepare_prompt` made of this body already (a caller that needed the resolved
    max_tokens first: ponder/service/openai/chat.py), so the prompt is not tokenized twice.
    `openai_response`: the job is a response of /v1/responses (Job.openai_response).
    `charge`: the request's rate limits (ponder/service/rate_limits.py): the job's tokens and its place
    among the key's live jobs are reserved before it is stored (a 429 when over a limit)."""
    if idempotency_key is not None:
        existing = _job_by_idempotency_key(session, key, idempotency_key)
        if existing is not None:
            return _same_request_or_conflict(existing, body), False
    if body.webhook_url is not None:
        check_webhook_url(str(body.webhook_url), settings, "webhook_url")
    prepared = prepared or prepare_prompt(body, settings)
    columns = job_columns(key.id, body, prepared, settings)
    job = Job(id=uuid.uuid4(), **columns, idempotency_key=idempotency_key, openai_response=openai_response)
    if charge is not None:
        charge.reserve(session, job.id, len(prepared.token_ids) + body.n * prepared.max_tokens, body.n)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        if charge is not None:
            charge.release(job.id)
        session.rollback()
        existing = _job_by_idempotency_key(session, key, idempotency_key)
        if existing is None:
            raise
        return _same_request_or_conflict(existing, body), False
    except BaseException:
        if charge is not None:
            charge.release(job.id)  # not stored: its reservation goes
        raise
    publisher.submit(str(job.id))  # after the commit: a worker must find the row it is told about
    return job, True


def create_jobs(
    session: Session,
    key: ApiKey,
    requests: list[tuple[JobCreate, PreparedPrompt]],
    settings: Settings,
    charge: RateLimitCharge | None = None,
    own_columns: dict[str, Any] | None = None,
) -> list[Job]:
    """Several checked, tokenized requests queued as jobs in one transaction (a legacy completion's
    prompts: ponder/service/openai/completions.py), each with `own_columns` too: all of them, or
    none (a 429 for any one releases the others' reservations)."""
    columns = [job_columns(key.id, body, prepared, settings) | (own_columns or {}) for body, prepared in requests]
    jobs = [Job(id=uuid.uuid4(), **job) for job in columns]
    try:
        for job, (body, prepared) in zip(jobs, requests, strict=True):
            if charge is not None:
                charge.reserve(session, job.id, len(prepared.token_ids) + body.n * prepared.max_tokens, body.n)
            session.add(job)
        session.commit()
    except BaseException:
        if charge is not None:  # not stored: no reservation stays
            for job in jobs:
                charge.release(job.id)
        raise
    for job in jobs:
        publisher.submit(str(job.id))  # after the commit
    return jobs


def job_columns(api_key_id: uuid.UUID, body: JobCreate, prepared: PreparedPrompt, settings: Settings) -> dict[str, Any]:
    """The columns of the queued job a checked, tokenized request is, by Job's attribute names (the
    others keep Job's defaults): `Job(**columns)`, or a row of a bulk insert (ponder/workers/batches.py)."""
    request = body.model_dump(mode="json", exclude_none=True) | {"max_tokens": prepared.max_tokens}
    return {
        "api_key_id": api_key_id,
        "model": settings.model,
        "request": request,
        "prompt_token_ids": prepared.token_ids,
        "prompt_tokens": len(prepared.token_ids),
        "meta": body.metadata or {},
        "webhook_url": str(body.webhook_url) if body.webhook_url else None,
        "expires_at": utcnow() + timedelta(seconds=settings.job_ttl_seconds),
    }


def _job_by_idempotency_key(session: Session, key: ApiKey, idempotency_key: str | None) -> Job | None:
    statement = select(Job).where(Job.api_key_id == key.id, Job.idempotency_key == idempotency_key)
    return session.exec(statement).first()


def _same_request_or_conflict(job: Job, body: JobCreate) -> Job:
    request = body.model_dump(mode="json", exclude_none=True)
    stored = dict(job.request)
    if "max_tokens" not in request:  # the stored request carries the default it was given
        stored.pop("max_tokens", None)
    if stored != request:
        raise Conflict("this Idempotency-Key was used with a different request", "Idempotency-Key")
    return job


def get_job(session: Session, key: ApiKey, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.api_key_id != key.id:  # another key's job does not exist for this caller
        raise NotFound(f"no job {job_id}", "job_id")
    return job


# The columns a list of jobs leaves unread: a job's kept values (and its checkpoint, which holds them
# too) may be 16 MiB packed, a page of 100 jobs over a gigabyte.
LISTED_WITHOUT = ("logprobs", "prompt_logprobs", "checkpoint")


def list_jobs(
    session: Session, key: ApiKey, status: JobStatus | None, cursor: str | None, limit: int
) -> tuple[list[Job], str | None]:
    """Newest first; the cursor points just past the last job of the previous page."""
    unread = [defer(getattr(Job, name)) for name in LISTED_WITHOUT]
    statement = select(Job).where(Job.api_key_id == key.id).options(*unread)
    if status is not None:
        statement = statement.where(Job.status == status)
    if cursor:
        created_at, job_id = _decode_cursor(cursor)
        statement = statement.where(
            (col(Job.created_at) < created_at) | ((col(Job.created_at) == created_at) & (col(Job.id) < job_id))
        )
    statement = statement.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
    jobs = list(session.exec(statement).all())
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest("invalid cursor", "cursor") from e


def cancel_job(session: Session, key: ApiKey, job_id: uuid.UUID, publish_cancel, settings: Settings) -> Job:
    """A queued job is cancelled at once (and its message revoked, its webhooks sent); a running
    one is flagged and its worker told to abort it at the next engine step."""
    job = get_job(session, key, job_id)
    now = utcnow()
    queued = session.exec(
        update(Job)
        .where(col(Job.id) == job.id, col(Job.status) == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=now, updated_at=now)
    )
    delivery_ids = record_final_event(session, job.id, settings) if queued.rowcount else []
    if queued.rowcount == 0:
        running = session.exec(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status) == JobStatus.running)
            .values(cancel_requested=True, updated_at=now)
        )
        if running.rowcount == 0:
            session.rollback()
            session.refresh(job)
            raise Conflict(f"job {job.id} is already {job.status}", "job_id")
    session.commit()
    session.refresh(job)
    for delivery_id in delivery_ids:  # after the commit: the webhooks worker must find the rows
        publisher.submit_delivery(str(delivery_id))
    if queued.rowcount:  # ended here, never run: it used no tokens, and its place is free
        settle(job.id, 0, settings)
    if job.status == JobStatus.cancelled:
        _best_effort(revoke_job, str(job.id))
    else:
        _best_effort(publish_cancel, str(job.id))
    return job


def delete_job(session: Session, key: ApiKey, job_id: uuid.UUID) -> Job:
    """Erase a finished job's prompt and output (ponder/service/retention.py; its usage stays). A queued
    or running job is 409: cancel it first. Erasing again changes nothing. The caller deletes the
    job's stream after this returns (the commit)."""
    job = get_job(session, key, job_id)
    if not job.is_final:
        message = f"job {job.id} is {job.status}: cancel it first (POST /v1/jobs/{job.id}/cancel), then delete it"
        raise Conflict(message, "job_id", code="job_not_finished")
    erase_jobs(session, [job.id])
    session.commit()
    return job


def _best_effort(action, job_id: str) -> None:
    try:
        action(job_id)
    except Exception:  # the database already says what happens; the message only speeds it up
        logger.exception("could not signal job %s", job_id)


def usage_report(session: Session, key: ApiKey) -> list[UsageRow]:
    day = func.date(Job.finished_at)
    statement = (
        select(  # type: ignore[call-overload]  # sqlmodel's overloads stop at 4 columns; select() takes any number
            day,
            Job.model,
            func.count(),
            func.sum(Job.prompt_tokens),
            func.sum(Job.cached_tokens),
            func.sum(Job.completion_tokens),
            func.sum(Job.reasoning_tokens),
            func.sum(Job.draft_tokens),
            func.sum(Job.accepted_draft_tokens),
        )
        .where(Job.api_key_id == key.id, col(Job.finished_at).is_not(None))
        .group_by(day, Job.model)
        .order_by(day, Job.model)
    )
    return [
        UsageRow(
            day=str(d),
            model=model,
            jobs=n,
            prompt_tokens=prompt or 0,
            cached_tokens=cached or 0,
            completion_tokens=completion or 0,
            reasoning_tokens=reasoning or 0,
            total_tokens=(prompt or 0) + (completion or 0),
            draft_tokens=drafted or 0,
            accepted_draft_tokens=accepted or 0,
        )
        for d, model, n, prompt, cached, completion, reasoning, drafted, accepted in session.exec(statement).all()
    ]
