"""Batches on beat's side (no engine): validate a batch's input file and make its jobs, then move
it on as its jobs end (ponder/service/openai/batches.py has the states). Every step is conditional on the
batch's status, so a task delivered twice, or beat's sweep racing a task, does no harm."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, func, insert, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ponder.service.batch_input import LineProblem, batch_lines, check_file
from ponder.service.db import durable, sql_engine
from ponder.service.openai.batches import UNFINISHED_BATCH, error_line, line_job, output_line
from ponder.service.openai.files import file_path, write_file
from ponder.service.queue import enqueue_batch_jobs, enqueue_batch_validation, enqueue_deliveries
from ponder.service.settings import Settings
from ponder.service.tables import (
    Batch,
    BatchLineError,
    BatchStatus,
    FilePurpose,
    Job,
    JobStatus,
    StoredFile,
    WebhookEvent,
    utcnow,
)
from ponder.service.webhooks.deliveries import event_targets, record_final_event
from ponder.workers.batch_admission import admit_lines, give_back

logger = logging.getLogger("ponder.batches")

CHUNK_LINES = 500  # lines per transaction: jobs stored, then their messages sent
_UNFINISHED_JOB = (JobStatus.queued, JobStatus.running)
_JOBS: Table = Job.__table__  # type: ignore[attr-defined]  # SQLModel's table classes have one; its stubs do not say so


# -- validation -----------------------------------------------------------------------------------


def validate_batch(batch_id: str, settings: Settings) -> str:
    """Check the input file as a whole (streamed), then make a job of each line, CHUNK_LINES per
    commit, each chunk's messages sent after its commit (the first lines run while the rest are
    read); then in_progress. A run after a crash resumes after the last line stored."""
    with Session(sql_engine(settings, background=True)) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != BatchStatus.validating:
            return "skipped: not validating"
        stored = session.get(StoredFile, batch.input_file_id)
    path = file_path(settings, batch.input_file_id)
    if stored is None or stored.api_key_id != batch.api_key_id or not path.exists():
        problems = [LineProblem("file_not_found", f"the input file {batch.input_file_id} no longer exists")]
    else:
        problems = check_file(path, batch.endpoint, settings.batch_max_requests, settings.max_request_bytes)
    if problems:
        _end_validation(
            batch_id, BatchStatus.failed, settings, failed_at=utcnow(), errors=[asdict(p) for p in problems]
        )
        return f"failed: {problems[0].message}"
    lines = batch_lines(path, batch.endpoint, settings.max_request_bytes, after=_last_line_stored(batch_id, settings))
    made = 0
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        rows = [line_job(line, batch, settings) for line in chunk]  # tokenized outside the transaction
        with Session(sql_engine(settings, background=True)) as session:
            rows = admit_lines(session, batch, rows, settings)  # the key's tokens per day
        job_ids = _store_chunk(batch_id, rows, settings)
        if job_ids is None:
            give_back(rows, settings)
            return f"stopped after {made} lines: the batch is no longer validating"
        _send(job_ids)
        made += len(rows)
    _end_validation(batch_id, BatchStatus.in_progress, settings, in_progress_at=utcnow())
    return f"in progress: {made} lines stored"


def _last_line_stored(batch_id: str, settings: Settings) -> int:
    with Session(sql_engine(settings, background=True)) as session:
        job_line = session.exec(select(func.max(Job.batch_line)).where(Job.batch_id == batch_id)).one()
        refused = select(func.max(BatchLineError.line)).where(BatchLineError.batch_id == batch_id)
        refused_line = session.exec(refused).one()
    return max(job_line or 0, refused_line or 0)


def _store_chunk(batch_id: str, lines: list[dict[str, Any] | BatchLineError], settings: Settings) -> list[Any] | None:
    """Store a chunk's jobs (one bulk INSERT) and refusals while the batch is still validating (the
    status check and the rows are one transaction: a cancel lands before or after a chunk, never
    inside it). Returns the jobs' ids; None when it is not (cancelled, or another run of this task
    stored these lines first)."""
    now = utcnow()
    jobs = _job_rows([line for line in lines if isinstance(line, dict)], now)
    with Session(sql_engine(settings, background=True)) as session:
        still = session.exec(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status) == BatchStatus.validating)
            .values(updated_at=now)
        )
        if not still.rowcount:
            session.rollback()
            return None
        session.add_all(line for line in lines if isinstance(line, BatchLineError))
        try:
            if jobs:
                session.connection().execute(insert(_JOBS), jobs)
            session.commit()
        except IntegrityError:  # a second delivery of the task got here first (the lines are unique)
            session.rollback()
            return None
    return [row["id"] for row in jobs]


def _job_rows(columns: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Rows of the jobs table for a bulk INSERT, by column name: Job's defaults (read from a Job
    made the ordinary way: constructing thousands of ORM objects is most of a validation's time),
    then each job's columns, then what must differ per row, its id and times."""
    if not columns:
        return []
    template = Job(**columns[0])
    attributes = {attribute.key: attribute.columns[0].name for attribute in sa_inspect(Job).column_attrs}
    defaults = {name: getattr(template, key) for key, name in attributes.items()}
    return [
        defaults
        | {attributes[key]: value for key, value in job.items()}
        | {"id": job.get("id") or uuid.uuid4(), "created_at": now, "updated_at": now}
        for job in columns
    ]


def _send(job_ids: list[Any]) -> None:
    try:
        enqueue_batch_jobs(job_ids)
    except Exception:  # the broker is away: the jobs are queued rows, which maintenance re-sends
        logger.exception("could not send %d batch jobs; maintenance will", len(job_ids))


def _end_validation(batch_id: str, status: BatchStatus, settings: Settings, **values: Any) -> None:
    with Session(sql_engine(settings, background=True)) as session:
        session.exec(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status) == BatchStatus.validating)
            .values(status=status, updated_at=utcnow(), **values)
        )
        session.commit()


# -- moving on ------------------------------------------------------------------------------------


def advance_batches(settings: Settings, publish_cancel: Callable[[str], None], batch_id: str | None = None) -> dict:
    """Each unfinished batch (or the one named): a validation whose message was lost is sent again;
    a cancelling batch's jobs are stopped; a batch whose lines are all done is finalized."""
    with Session(sql_engine(settings, background=True)) as session:
        statement = select(Batch.id).where(col(Batch.status).in_(UNFINISHED_BATCH))
        if batch_id is not None:
            statement = statement.where(Batch.id == batch_id)
        batch_ids = list(session.exec(statement).all())
    outcomes: dict[str, int] = {}
    for each in batch_ids:
        outcome = advance_batch(each, settings, publish_cancel)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def advance_batch(batch_id: str, settings: Settings, publish_cancel: Callable[[str], None]) -> str:
    with Session(sql_engine(settings, background=True)) as session:
        batch = session.get(Batch, batch_id)
    if batch is None:
        return "gone"
    if batch.status == BatchStatus.validating:
        return _resend_validation(batch, settings)
    if batch.status == BatchStatus.cancelling:
        _stop_jobs(batch, settings, publish_cancel)
    if _unfinished_jobs(batch_id, settings):
        return "running"
    return _finalize(batch, settings)


def _resend_validation(batch: Batch, settings: Settings) -> str:
    """A validation stores a chunk every second or so; a batch untouched for longer than a queued
    job may wait for its message has lost its validation (an API or beat that died)."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.resend_queued_after_seconds)
    with Session(sql_engine(settings, background=True)) as session:
        stale = session.exec(
            update(Batch)
            .where(
                col(Batch.id) == batch.id,
                col(Batch.status) == BatchStatus.validating,
                col(Batch.updated_at) < stale_before,
            )
            .values(updated_at=now)
        )
        session.commit()
    if not stale.rowcount:
        return "validating"
    enqueue_batch_validation(batch.id)
    return "validation re-sent"


def _stop_jobs(batch: Batch, settings: Settings, publish_cancel: Callable[[str], None]) -> None:
    """A cancelling batch: its queued jobs are cancelled (with their webhooks, as a job's own cancel
    has them), its running ones asked to stop at their next engine step (partial output kept)."""
    now = utcnow()
    with Session(sql_engine(settings, background=True)) as session:
        durable(session)  # cancelled jobs, with their webhooks
        targets = event_targets(session, batch.api_key_id, None, WebhookEvent.cancelled)  # batch jobs have no URL
        cancelled = session.scalars(
            update(Job)
            .where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.queued)
            .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=now, updated_at=now)
            .returning(col(Job.id))
        ).all()
        deliveries = [d for job_id in cancelled for d in record_final_event(session, job_id, settings, targets)]
        running = session.scalars(
            update(Job)
            .where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.running, ~col(Job.cancel_requested))
            .values(cancel_requested=True, updated_at=now)
            .returning(col(Job.id))
        ).all()
        session.commit()
    enqueue_deliveries(deliveries)
    for job_id in running:
        publish_cancel(str(job_id))


def _unfinished_jobs(batch_id: str, settings: Settings) -> bool:
    with Session(sql_engine(settings, background=True)) as session:
        statement = select(Job.id).where(col(Job.batch_id) == batch_id, col(Job.status).in_(_UNFINISHED_JOB))
        return session.exec(statement.limit(1)).first() is not None


def _finalize(batch: Batch, settings: Settings) -> str:
    """Every line is done: finalizing, then the output and error files, then the final status
    (cancelled for a cancelling batch; expired if a line ran out of the window; else completed).
    The files' ids come from the batch's, so a finalization run again rewrites the same files."""
    if batch.status == BatchStatus.in_progress and not _move(
        batch, BatchStatus.finalizing, settings, finalizing_at=utcnow()
    ):
        return "moved on elsewhere"
    final = _final_status(batch, settings)
    with Session(sql_engine(settings, background=True)) as session:
        durable(session)  # the batch's end, which its client then reads
        output = _write(session, batch, "output", _output_lines(batch, settings), settings)
        errors = _write(session, batch, "error", _error_lines(batch, settings), settings)
        now = utcnow()
        moved = session.exec(
            update(Batch)
            .where(col(Batch.id) == batch.id, col(Batch.status) == batch.status)
            .values(
                status=final,
                output_file_id=output,
                error_file_id=errors,
                updated_at=now,
                **{f"{final}_at": now},
            )
        )
        if not moved.rowcount:
            session.rollback()
            return "moved on elsewhere"
        session.commit()
    return str(final)


def _move(batch: Batch, status: BatchStatus, settings: Settings, **values: Any) -> bool:
    with Session(sql_engine(settings, background=True)) as session:
        moved = session.exec(
            update(Batch)
            .where(col(Batch.id) == batch.id, col(Batch.status) == batch.status)
            .values(status=status, updated_at=utcnow(), **values)
        )
        session.commit()
    if moved.rowcount:
        batch.status = status
    return bool(moved.rowcount)


def _final_status(batch: Batch, settings: Settings) -> BatchStatus:
    if batch.status == BatchStatus.cancelling:
        return BatchStatus.cancelled
    with Session(sql_engine(settings, background=True)) as session:
        statement = select(Job.id).where(col(Job.batch_id) == batch.id, col(Job.status) == JobStatus.expired)
        expired = session.exec(statement.limit(1)).first() is not None
    return BatchStatus.expired if expired else BatchStatus.completed


def _write(session: Session, batch: Batch, kind: str, lines: Iterator[bytes], settings: Settings) -> str | None:
    """The batch's output or error file; None (no file) when it has no line."""
    first = next(lines, None)
    if first is None:
        return None
    file_id = f"file-{uuid.uuid5(uuid.NAMESPACE_URL, f'ponder:{batch.id}:{kind}').hex}"
    filename = f"{batch.id}_{kind}.jsonl"
    purpose = FilePurpose.batch_output
    write_file(session, batch.api_key_id, file_id, filename, purpose, itertools.chain([first], lines), settings)
    return file_id


def _batch_jobs(batch_id: str, succeeded: bool, settings: Settings) -> Iterator[Job]:
    """The batch's final jobs that did (or did not) succeed, in line order, a few hundred at a time."""
    status = col(Job.status)
    which = status == JobStatus.succeeded if succeeded else status != JobStatus.succeeded
    with Session(sql_engine(settings, background=True)) as session:
        statement = (
            select(Job)
            .where(col(Job.batch_id) == batch_id, which)
            .order_by(col(Job.batch_line))
            .execution_options(yield_per=CHUNK_LINES)
        )
        yield from session.exec(statement)


def _refused_lines(batch_id: str, settings: Settings) -> Iterator[BatchLineError]:
    with Session(sql_engine(settings, background=True)) as session:
        statement = (
            select(BatchLineError)
            .where(BatchLineError.batch_id == batch_id)
            .order_by(col(BatchLineError.line))
            .execution_options(yield_per=CHUNK_LINES)
        )
        yield from session.exec(statement)


def _output_lines(batch: Batch, settings: Settings) -> Iterator[bytes]:
    for job in _batch_jobs(batch.id, True, settings):
        yield output_line(job, batch.endpoint, settings)


def _error_lines(batch: Batch, settings: Settings) -> Iterator[bytes]:
    """Refused lines and jobs that did not succeed, merged in line order."""
    refused: Iterator[tuple[int, Job | BatchLineError]] = (
        (item.line, item) for item in _refused_lines(batch.id, settings)
    )
    failed: Iterator[tuple[int, Job | BatchLineError]] = (
        (job.batch_line or 0, job) for job in _batch_jobs(batch.id, False, settings)
    )
    for _, item in heapq.merge(refused, failed, key=lambda pair: pair[0]):
        yield error_line(item)


# -- retention ------------------------------------------------------------------------------------

FILES_PURGE_CHUNK = 500


def purge_old_files(settings: Settings) -> dict[str, int]:
    """Retention (`PONDER_RETENTION_DAYS`, beside ponder/workers/maintenance.py:purge_old_jobs): a file
    holds prompts (an upload) or outputs (a batch's results, made when it ended), so every file
    created longer ago than that is deleted, row then bytes, except the input of a batch still
    running. The batches stay (their file ids then name no file, a 404, as after DELETE). Nothing
    when retention_days is 0. Idempotent: a deleted file is not selected again."""
    if not settings.retention_days:
        return {"files_deleted": 0}
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    in_use = select(Batch.input_file_id).where(col(Batch.status).in_(UNFINISHED_BATCH))
    deleted = 0
    while True:
        with Session(sql_engine(settings, background=True)) as session:
            file_ids = session.exec(
                select(StoredFile.id)
                .where(col(StoredFile.created_at) < cutoff, col(StoredFile.id).not_in(in_use))
                .limit(FILES_PURGE_CHUNK)
            ).all()
            session.exec(delete(StoredFile).where(col(StoredFile.id).in_(file_ids)))
            session.commit()
        for file_id in file_ids:
            with contextlib.suppress(FileNotFoundError):  # the row was the file; the bytes go after it
                file_path(settings, file_id).unlink()
        deleted += len(file_ids)
        if len(file_ids) < FILES_PURGE_CHUNK:
            return {"files_deleted": deleted}
