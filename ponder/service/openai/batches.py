"""OpenAI's Batch API over Ponder's jobs: each line of a batch's input file is an ordinary job
(the same mapping as its endpoint's route, the same queue, usage and /v1/jobs listing), queued
behind every direct request (ponder/service/queue.py:BATCH_PRIORITY).

A batch's life, moved on by beat's tasks (ponder/workers/batches.py), each step a conditional UPDATE on
its status so that a task run twice, or beat racing a cancel, changes nothing:

    validating -> in_progress -> finalizing -> completed | expired
    validating -> failed                        (the file is invalid as a whole: no job is made)
    validating | in_progress -> cancelling -> cancelled

A line whose body the endpoint refuses (as its route would answer 400 or 404) is no job: it fails
alone (BatchLineError), in the error file. `request_counts` are counted from the batch's jobs and
refused lines whenever the batch is read. The batch's window (24 h) is its jobs' deadline: when it
passes, the lines not done expire (batch_expired) and the batch ends `expired`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, tuple_, update
from sqlmodel import Session, col, select

from ponder.service.batch_input import BatchLine
from ponder.service.errors import (
    Conflict,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    ServiceError,
    body_of,
    describe_validation_error,
    openai_status_code,
    status_code_of,
)
from ponder.service.job_rules import job_columns
from ponder.service.openai.batch_schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchObject,
    RequestCounts,
)
from ponder.service.openai.chat import chat_completion, chat_renames, job_request
from ponder.service.openai.chat_schemas import ChatCompletionCreate
from ponder.service.openai.common import job_error, prepared_request, unix_time
from ponder.service.openai.completion_schemas import CompletionCreate
from ponder.service.openai.completions import COMPLETION_RENAMES, completion, completion_requests, shown_completion
from ponder.service.openai.files import get_file
from ponder.service.openai.response_schemas import ResponseCreate
from ponder.service.openai.responses import prepared_response, response_object, shown_request
from ponder.service.prompts import PreparedPrompt
from ponder.service.queue import publisher
from ponder.service.schemas import JobCreate
from ponder.service.security import one_at_a_time
from ponder.service.settings import Settings
from ponder.service.tables import (
    FINAL_STATUSES,
    Batch,
    BatchLineError,
    BatchStatus,
    FilePurpose,
    Job,
    JobStatus,
    utcnow,
)

COMPLETION_WINDOW = timedelta(hours=24)
_Request = TypeVar("_Request", bound=BaseModel)
UNFINISHED_BATCH = (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.cancelling, BatchStatus.finalizing)
# Why a line that never answered is in the error file (OpenAI's codes).
_NOT_DONE = {
    JobStatus.cancelled: ("batch_cancelled", "the request was cancelled before it finished"),
    JobStatus.expired: ("batch_expired", "the request was not done within the batch's completion window"),
}


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# -- endpoints: a line's body as its route would take it, and its answer ------------------------


@dataclass(frozen=True)
class Endpoint:
    """A batch endpoint: `prepare` takes a line's body as its route would (checked and tokenized,
    no commit; a ServiceError is the route's answer) and returns the request, its prompt and any job
    columns of its own; `answer` is the route's answer for a job that succeeded."""

    prepare: Callable[[dict[str, Any], Settings], tuple[JobCreate, PreparedPrompt, dict[str, Any]]]
    answer: Callable[[Job, Settings], dict[str, Any]]


def _validated(model: type[_Request], body: dict[str, Any]) -> _Request:
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(*describe_validation_error(e.errors(include_url=False))) from e
    if getattr(request, "stream", None):
        raise InvalidRequest("stream is not supported in a batch: the answer is a line of the output file", "stream")
    return request


def _chat_request(body: dict[str, Any], settings: Settings) -> tuple[JobCreate, PreparedPrompt, dict[str, Any]]:
    """POST /v1/chat/completions's mapping (ponder/service/openai/chat.py), without the commit."""
    chat = _validated(ChatCompletionCreate, body)
    request, prepared = prepared_request(
        job_request(chat, settings), chat.reasoning_effort, settings, chat_renames(chat)
    )
    return request, prepared, {}


def _response_request(body: dict[str, Any], settings: Settings) -> tuple[JobCreate, PreparedPrompt, dict[str, Any]]:
    """POST /v1/responses's mapping (ponder/service/openai/responses.py), without the commit: the job is a
    response, which GET /v1/responses/{id} reads too."""
    response = _validated(ResponseCreate, body)
    request, prepared = prepared_response(response, settings)
    return request, prepared, {"openai_response": shown_request(response)}


def _completion_request(body: dict[str, Any], settings: Settings) -> tuple[JobCreate, PreparedPrompt, dict[str, Any]]:
    """POST /v1/completions's mapping (ponder/service/openai/completions.py), without the commit: a
    line is one job, so its prompt is one prompt."""
    completion = _validated(CompletionCreate, body)
    requests = completion_requests(completion, settings)
    if len(requests) != 1:
        raise InvalidRequest("a batch line's prompt is one prompt (a string or token ids): a line is one job", "prompt")
    request, prepared = prepared_request(requests[0], None, settings, COMPLETION_RENAMES)
    return request, prepared, {"openai_completion": shown_completion(completion)}


ENDPOINTS = {
    "/v1/chat/completions": Endpoint(_chat_request, lambda job, s: chat_completion(job, s).model_dump(mode="json")),
    "/v1/completions": Endpoint(_completion_request, lambda job, s: completion([job], s).model_dump(mode="json")),
    "/v1/responses": Endpoint(_response_request, lambda job, s: response_object(job, s).model_dump(mode="json")),
}


def line_job(line: BatchLine, batch: Batch, settings: Settings) -> dict[str, Any] | BatchLineError:
    """The job a batch line is (its columns: ponder/service/job_rules.py:job_columns), or its refusal: the
    error its route would have answered (a 422 is a 400 there: ponder/service/errors.py:openai_status_code)."""
    try:
        request, prepared, own_columns = ENDPOINTS[batch.endpoint].prepare(line.body, settings)
    except ServiceError as e:
        status = openai_status_code(e)
        return BatchLineError(
            batch_id=batch.id, line=line.number, custom_id=line.custom_id, status_code=status, body=body_of(e, status)
        )
    batch_columns = {"batch_id": batch.id, "batch_line": line.number, "batch_custom_id": line.custom_id}
    columns = job_columns(batch.api_key_id, request, prepared, settings) | own_columns | batch_columns
    return columns | {"expires_at": batch.expires_at}


# -- the routes' rules ----------------------------------------------------------------------------


def create_batch(session: Session, key_id: uuid.UUID, body: BatchCreate, settings: Settings) -> Batch:
    """Store the batch (validating) and, after the commit, send its validation; a 429
    `too_many_batches` when the key has PONDER_MAX_BATCHES_PER_KEY unfinished already."""
    if body.endpoint not in ENDPOINTS:
        supported = ", ".join(ENDPOINTS)
        raise InvalidRequest(f"endpoint {body.endpoint!r} is not supported (only {supported})", "endpoint")
    stored = get_file(session, key_id, body.input_file_id)
    if stored.purpose != FilePurpose.batch:
        message = f"file {stored.id} has purpose {stored.purpose!r}: a batch's input is uploaded with purpose 'batch'"
        raise InvalidRequest(message, "input_file_id")
    one_at_a_time(session, key_id)  # the count below sees every batch committed before
    unfinished = session.exec(
        select(func.count()).where(Batch.api_key_id == key_id, col(Batch.status).in_(UNFINISHED_BATCH))
    ).one()
    if unfinished >= settings.max_batches_per_key:
        message = f"this key has {unfinished} unfinished batches, its limit (PONDER_MAX_BATCHES_PER_KEY); wait for one"
        raise LimitExceeded(message, code="too_many_batches")
    now = utcnow()
    batch = Batch(
        id=new_batch_id(),
        api_key_id=key_id,
        endpoint=body.endpoint,
        input_file_id=stored.id,
        completion_window=body.completion_window,
        meta=body.metadata,
        created_at=now,
        expires_at=now + COMPLETION_WINDOW,
        updated_at=now,
    )
    session.add(batch)
    session.commit()
    publisher.submit_batch(batch.id)  # after the commit: the task must find the row
    return batch


def get_batch(session: Session, key_id: uuid.UUID, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.api_key_id != key_id:  # another key's batch does not exist for this caller
        raise NotFound(f"no batch {batch_id}", "batch_id")
    return batch


def list_batches(session: Session, key_id: uuid.UUID, after: str | None, limit: int) -> tuple[list[Batch], bool]:
    """Newest first; `after`: the last id of the page before. Returns the page and whether more follow."""
    statement = select(Batch).where(Batch.api_key_id == key_id)
    if after is not None:
        last = get_batch(session, key_id, after)
        statement = statement.where(tuple_(col(Batch.created_at), col(Batch.id)) < tuple_(last.created_at, last.id))
    statement = statement.order_by(col(Batch.created_at).desc(), col(Batch.id).desc()).limit(limit + 1)
    rows = list(session.exec(statement).all())
    return rows[:limit], len(rows) > limit


def cancel_batch(session: Session, key_id: uuid.UUID, batch_id: str) -> Batch:
    """cancelling at once; beat's task then cancels its queued jobs, asks the running ones to stop,
    and ends it `cancelled` with the output of the lines done (a message speeds that up)."""
    batch = get_batch(session, key_id, batch_id)
    now = utcnow()
    moved = session.exec(
        update(Batch)
        .where(col(Batch.id) == batch.id, col(Batch.status).in_([BatchStatus.validating, BatchStatus.in_progress]))
        .values(status=BatchStatus.cancelling, cancelling_at=now, updated_at=now)
    )
    session.commit()
    session.refresh(batch)
    if moved.rowcount:
        publisher.submit_batch_advance(batch.id)
    elif batch.status != BatchStatus.cancelling:
        raise Conflict(f"batch {batch.id} is {batch.status}: it can no longer be cancelled", "batch_id")
    return batch


# -- what a batch shows ---------------------------------------------------------------------------


def request_counts(session: Session, batch_ids: list[str]) -> dict[str, RequestCounts]:
    """Counted now from the batches' jobs (a final one that did not succeed failed) and refused lines."""
    counts = {batch_id: RequestCounts() for batch_id in batch_ids}
    by_status = session.exec(
        select(Job.batch_id, Job.status, func.count())
        .where(col(Job.batch_id).in_(batch_ids))
        .group_by(col(Job.batch_id), col(Job.status))
    ).all()
    for batch_id, status, n in by_status:
        assert batch_id is not None  # selected by batch
        counts[batch_id].total += n
        if status == JobStatus.succeeded:
            counts[batch_id].completed += n
        elif status in FINAL_STATUSES:
            counts[batch_id].failed += n
    refused = session.exec(
        select(BatchLineError.batch_id, func.count())
        .where(col(BatchLineError.batch_id).in_(batch_ids))
        .group_by(col(BatchLineError.batch_id))
    ).all()
    for batch_id, n in refused:
        counts[batch_id].total += n
        counts[batch_id].failed += n
    return counts


def batch_objects(session: Session, batches: list[Batch]) -> list[BatchObject]:
    counts = request_counts(session, [batch.id for batch in batches])
    return [_batch_object(batch, counts[batch.id]) for batch in batches]


def _batch_object(batch: Batch, counts: RequestCounts) -> BatchObject:
    errors = BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None
    times = {
        name: _unix(getattr(batch, name))
        for name in (
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        )
    }
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=errors,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=BatchStatus(batch.status),
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=unix_time(batch.created_at),
        request_counts=counts,
        metadata=batch.meta,
        **times,
    )


def _unix(at: datetime | None) -> int | None:
    return None if at is None else unix_time(at)


# -- result lines ---------------------------------------------------------------------------------


def output_line(job: Job, endpoint: str, settings: Settings) -> bytes:
    """A line of the output file: a request that succeeded, answered as its route would have."""
    response = {
        "status_code": 200,
        "request_id": f"req_{job.id.hex}",
        "body": ENDPOINTS[endpoint].answer(job, settings),
    }
    return _line(f"batch_req_{job.id.hex}", job.batch_custom_id, response, None)


def error_line(item: Job | BatchLineError) -> bytes:
    """A line of the error file. A request answered with an error has its `response` (status and
    body, `error` null); one that never answered (cancelled, expired) has `error` {code, message}."""
    if isinstance(item, BatchLineError):
        request_id = _refused_id(item)
        response = {"status_code": item.status_code, "request_id": f"req_{request_id}", "body": item.body}
        return _line(f"batch_req_{request_id}", item.custom_id, response, None)
    not_done = _NOT_DONE.get(JobStatus(item.status))
    if not_done is not None:
        code, message = not_done
        return _line(f"batch_req_{item.id.hex}", item.batch_custom_id, None, {"code": code, "message": message})
    error = job_error(item)
    response = {"status_code": status_code_of(error), "request_id": f"req_{item.id.hex}", "body": body_of(error)}
    return _line(f"batch_req_{item.id.hex}", item.batch_custom_id, response, None)


def _refused_id(item: BatchLineError) -> str:
    """A refused line has no job: its id is made from the batch and the line (the same every time)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"ponder:{item.batch_id}:{item.line}").hex


def _line(request_id: str, custom_id: str | None, response: dict | None, error: dict | None) -> bytes:
    line = {"id": request_id, "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"
