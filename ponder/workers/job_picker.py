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

from ponder.service.tables import ApiKey, Batch, BatchStatus, Job, JobStatus
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
        demand = Demand(len(prompt_token_ids), request["max_tokens"], request.get("n", 1), batch_id is not None)
        return cls(job_id, demand, batch_id is not None)


PICK_COLUMNS = (col(Job.id), col(Job.prompt_token_ids), col(Job.request), col(Job.batch_id))


def ready(now: datetime) -> ColumnElement[bool]:
    """A queued job that may be claimed. Its deadline is compared through coalesce (the column is
    never null) so that no index serves that range: SQLite's planner, without statistics, took
    ix_jobs_status_expires for it and scanned every queued job at each pick, a batch's 50,000
    lines among them, instead of seeking by class and batch (ix_jobs_status_batch_*)."""
    deadline = func.coalesce(col(Job.expires_at), now)
    return (col(Job.status) == JobStatus.queued) & ~col(Job.cancel_requested) & (deadline > now)


def lapsed(now: datetime) -> ColumnElement[bool]:
    """A running job whose worker let its lease lapse (lost, or paused): claimable again."""
    return (col(Job.status) == JobStatus.running) & (col(Job.lease_expires_at) < now) & (col(Job.expires_at) > now)


def pick_next_job(session: Session, now: datetime, message_job_id: uuid.UUID | None = None) -> Pick | None:
    """The fair pick; the message's own job when it is one the rule allows (queued, of the class
    and the key picked), so that a task in Flower is, as a rule, the job it names. Interactive
    work first, its keys ranked from one grouped scan of the queued interactive jobs; only when
    none waits, the batch lines, ranked from the first line of each open batch: a batch queues
    up to 50,000 lines, and a scan of them at every pick made each pick cost ~100 ms of a core."""
    waiting = _waiting_keys(session, now)
    if waiting:
        picked = min(waiting, key=lambda k: (k.running / k.weight, k.oldest))
        interactive = ready(now) & col(Job.batch_id).is_(None) & (col(Job.api_key_id) == picked.api_key_id)
        return _job_of(session, interactive, message_job_id)
    return _batch_line(session, now, message_job_id)


@dataclass(frozen=True)
class _WaitingKey:
    api_key_id: uuid.UUID
    oldest: datetime  # its oldest queued job of the class
    running: float  # the samples of its running jobs, of any class, on every worker
    weight: float


def _running_samples():
    """The samples of each key's running jobs (a job of n samples fills n engine slots), correlated
    with ApiKey.id. Built once: an alias and its columns' adaptation cost ~1.5 ms of a core each
    time, 300 times the query's own 5 us, at every pick."""
    other = aliased(Job)
    return (
        select(func.coalesce(func.sum(func.coalesce(other.request["n"].as_integer(), 1)), 0))
        .select_from(other)
        .where(other.status == JobStatus.running, other.api_key_id == col(ApiKey.id))
        .scalar_subquery()
    )


_RUNNING = _running_samples()


def _waiting_keys(session: Session, now: datetime) -> list[_WaitingKey]:
    """Each key with interactive jobs ready to claim, with what the rule weighs."""
    rows = session.execute(  # SQLAlchemy's select: SQLModel's is typed for up to four columns
        sa_select(col(Job.api_key_id), func.min(Job.created_at), _RUNNING, col(ApiKey.weight))
        .join(ApiKey, col(ApiKey.id) == col(Job.api_key_id))
        .where(ready(now), col(Job.batch_id).is_(None))
        .group_by(col(Job.api_key_id), col(ApiKey.id), col(ApiKey.weight))
    ).all()
    return [_WaitingKey(key, oldest, running, weight) for key, oldest, running, weight in rows]


# A batch whose lines may run: its validation stores lines and sends them as it goes.
OPEN_BATCH = (BatchStatus.validating, BatchStatus.in_progress)


def _batch_line(session: Session, now: datetime, message_job_id: uuid.UUID | None) -> Pick | None:
    """The next line of the key picked among the keys of open batches (the same rule), in file
    order; the message's own job when it is one of that key's ready lines. Each open batch's first
    ready line is one index seek (ix_jobs_status_batch_line)."""
    open_batches = session.exec(select(Batch.id).where(col(Batch.status).in_(OPEN_BATCH))).all()
    first_lines = [line for batch_id in open_batches if (line := _first_line(session, now, batch_id)) is not None]
    if not first_lines:
        return None
    ranked = session.execute(
        sa_select(col(ApiKey.id), _RUNNING, col(ApiKey.weight)).where(
            col(ApiKey.id).in_({line.api_key_id for line in first_lines})
        )
    ).all()
    share = {key: running / weight for key, running, weight in ranked}
    line = min(first_lines, key=lambda line: (share[line.api_key_id], line.created_at, line.batch_line))
    own = ready(now) & col(Job.batch_id).in_(open_batches) & (col(Job.api_key_id) == line.api_key_id)
    if message_job_id is not None and (row := session.exec(_pick_of(own, message_job_id)).first()):
        return Pick.of_row(*row)
    return Pick.of_row(line.id, line.prompt_token_ids, line.request, line.batch_id)


def _first_line(session: Session, now: datetime, batch_id: str):
    return session.exec(
        select(Job).where(ready(now), col(Job.batch_id) == batch_id).order_by(col(Job.batch_line)).limit(1)
    ).first()


def _pick_of(waiting: ColumnElement[bool], job_id: uuid.UUID):
    return select(*PICK_COLUMNS).where(waiting, col(Job.id) == job_id)


def direct_job_ready(session: Session, now: datetime) -> bool:
    """Whether a direct (interactive) job waits to be claimed: one index seek."""
    waiting = select(Job.id).where(ready(now), col(Job.batch_id).is_(None)).limit(1)
    return session.exec(waiting).first() is not None


def _job_of(session: Session, waiting: ColumnElement[bool], message_job_id: uuid.UUID | None) -> Pick | None:
    """The message's own job if it is waiting here, else the oldest (None: claimed elsewhere since
    the key was chosen)."""
    oldest = select(*PICK_COLUMNS).where(waiting).order_by(col(Job.created_at), col(Job.batch_line)).limit(1)
    own = session.exec(_pick_of(waiting, message_job_id)).first() if message_job_id is not None else None
    row = own or session.exec(oldest).first()
    return Pick.of_row(*row) if row is not None else None
