"""Which queued job a free worker slot takes: fair share between API keys, chosen in the database.

A Celery message means "a slot may take one job", not "run this job": the worker that gets one
picks the job here and claims it (ponder/workers/job_runner.py). So a key that queued 1,000 jobs ahead of
another key's one does not make that one wait behind them; messages still carry a job id (the job
they were sent for, which Flower shows) and their order is kept, but not the choice.

The rule, in order:
1. interactive jobs (direct requests) before batch jobs (a batch fills what interactive work leaves);
2. among the keys with such jobs queued, the key with the least running work: the samples of its
   running jobs (on every worker; a job of n samples fills n engine slots) divided by its weight
   (`ApiKey.weight`, default 1: weight 2 gets twice the slots of weight 1 when both have work
   queued);
3. ties go to the key whose oldest queued job is oldest; within the key, the message's own job if
   it is queued there (so a task in Flower is, as a rule, the job it names), else the oldest (a
   batch's lines, stored together, in file order).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.workers.kv_reservations import Demand


@dataclass(frozen=True)
class Pick:
    job_id: uuid.UUID
    demand: Demand
    batch: bool

    @classmethod
    def of_row(
        cls, job_id: uuid.UUID, prompt_token_ids: Sequence[int], request: Mapping[str, Any], batch_id: str | None
    ) -> Pick:
        demand = Demand(len(prompt_token_ids), request["max_tokens"], request.get("n", 1))
        return cls(job_id, demand, batch_id is not None)


PICK_COLUMNS = (col(Job.id), col(Job.prompt_token_ids), col(Job.request), col(Job.batch_id))


def ready(now: datetime) -> ColumnElement[bool]:
    """A queued job that may be claimed."""
    return (col(Job.status) == JobStatus.queued) & ~col(Job.cancel_requested) & (col(Job.expires_at) > now)


def lapsed(now: datetime) -> ColumnElement[bool]:
    """A running job whose worker let its lease lapse (lost, or paused): claimable again."""
    return (col(Job.status) == JobStatus.running) & (col(Job.lease_expires_at) < now) & (col(Job.expires_at) > now)


def pick_next_job(session: Session, now: datetime, message_job_id: uuid.UUID | None = None) -> Pick | None:
    """The fair pick; the message's own job when it is one the rule allows (queued, of the class
    and the key picked), so that a task in Flower is, as a rule, the job it names. Two queries: the
    keys ranked (one grouped scan of the queued jobs), then the job of the key picked."""
    waiting = _waiting_keys(session, now)
    if not waiting:
        return None
    picked = min(waiting, key=lambda k: (k.batch, k.running / k.weight, k.oldest))
    in_class = col(Job.batch_id).is_not(None) if picked.batch else col(Job.batch_id).is_(None)
    return _job_of(session, ready(now) & in_class & (col(Job.api_key_id) == picked.api_key_id), message_job_id)


@dataclass(frozen=True)
class _WaitingKey:
    batch: bool  # the rule's first criterion: interactive (False) before batch
    api_key_id: uuid.UUID
    oldest: datetime  # its oldest queued job of the class
    running: int  # the samples of its running jobs, of any class, on every worker
    weight: float


def _waiting_keys(session: Session, now: datetime) -> list[_WaitingKey]:
    """Each (class, key) with jobs ready to claim, with what the rule weighs."""
    is_batch = col(Job.batch_id).is_not(None)
    other = aliased(Job)
    running = (
        select(func.coalesce(func.sum(func.coalesce(other.request["n"].as_integer(), 1)), 0))
        .select_from(other)
        .where(other.status == JobStatus.running, other.api_key_id == ApiKey.id)
        .scalar_subquery()
    )
    rows = session.execute(  # SQLAlchemy's select: SQLModel's is typed for up to four columns
        sa_select(is_batch, col(Job.api_key_id), func.min(Job.created_at), running, col(ApiKey.weight))
        .join(ApiKey, col(ApiKey.id) == col(Job.api_key_id))
        .where(ready(now))
        .group_by(is_batch, col(Job.api_key_id), col(ApiKey.id), col(ApiKey.weight))
    ).all()
    return [_WaitingKey(bool(batch), key, oldest, count, weight) for batch, key, oldest, count, weight in rows]


def _job_of(session: Session, waiting: ColumnElement[bool], message_job_id: uuid.UUID | None) -> Pick | None:
    """The message's own job if it is waiting here, else the oldest (None: claimed elsewhere since
    the key was chosen)."""
    own = select(*PICK_COLUMNS).where(waiting, col(Job.id) == message_job_id)
    oldest = select(*PICK_COLUMNS).where(waiting).order_by(col(Job.created_at), col(Job.batch_line)).limit(1)
    row = (session.exec(own).first() if message_job_id is not None else None) or session.exec(oldest).first()
    return Pick.of_row(*row) if row is not None else None
