"""What the OpenAI routes share: a request's JobCreate (every bound checked, errors in the request's
own terms), the thinking budget of a reasoning effort, the job's queueing, and waiting for or
cancelling it (docs/api.md has the routes).

reasoning_effort is a thinking budget, `max_reasoning_tokens`, as a share of the completion
tokens (which count the reasoning): low 20%, medium 50%, high 80%, rounded down, so that even
high leaves a fifth of them for the answer. Unset, there is no budget (the model ends its
reasoning when it will, as for /v1/jobs); an explicit `max_reasoning_tokens` wins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlmodel import Session

from ponder.service.db import sql_engine
from ponder.service.errors import (
    ClientClosed,
    Conflict,
    InvalidRequest,
    JobFailed,
    JobTimedOut,
    NotFound,
    ServiceError,
    body_of,
    describe_validation_error,
)
from ponder.service.job_public import SamplePublic
from ponder.service.job_rules import cancel_job, create_job
from ponder.service.openai.chat_schemas import ChatCompletionCreate, ChatMessage
from ponder.service.openai.models import check_model
from ponder.service.openai.response_schemas import InputMessage, ResponseCreate
from ponder.service.prompts import PreparedPrompt, prepare_prompt
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import JobSignals, read_job_events
from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.service.threads import run_in_threadpool, run_shielded

logger = logging.getLogger("ponder.api")


REASONING_EFFORT_SHARES = {"low": 0.2, "medium": 0.5, "high": 0.8}


# What a job that did not succeed answers, instead of a completion. x-should-retry: false keeps
# OpenAI's SDKs from retrying 409s and 5xx, which would start the whole job again.
_UNFINISHED: dict[JobStatus, tuple[type[ServiceError], str]] = {
    JobStatus.failed: (JobFailed, "job_failed"),
    JobStatus.cancelled: (Conflict, "job_cancelled"),
    JobStatus.expired: (JobTimedOut, "job_expired"),
}


JOB_ID_HEADER = "x-ponder-job-id"  # on every chat completion: the job it is, at /v1/jobs/{id}
JOB_IDS_HEADER = "x-ponder-job-ids"  # on a legacy completion: its prompts' jobs, in order


def with_user(metadata: dict[str, str] | None, user: str | None) -> dict[str, str] | None:
    """OpenAI's `user` is kept in the job's metadata as `user`, unless the metadata has one."""
    if user is None or "user" in (metadata or {}):
        return metadata
    return {**(metadata or {}), "user": user}


def job_messages(messages: Sequence[ChatMessage | InputMessage]) -> list[dict[str, Any]]:
    # `developer` is `system` under its newer name; R1's conventions fold either into the first user turn.
    return [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content,
            "tool_calls": getattr(m, "tool_calls", None),
            "tool_call_id": getattr(m, "tool_call_id", None),
        }
        for m in messages
    ]


def job_fields(
    body: ChatCompletionCreate | ResponseCreate,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    settings: Settings,
) -> dict[str, Any]:
    """The JobCreate fields a chat completion or a response request names alike (the model checked
    first, `stream_options` only with a stream)."""
    check_model(body.model, settings)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", "stream_options")
    return {
        "messages": messages,
        "model": body.model,
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop,
        "max_reasoning_tokens": body.max_reasoning_tokens,
        "math": body.math,
        "structured_outputs": body.structured_outputs,
        "metadata": with_user(body.metadata, body.user),
    }


def job_create(fields: dict[str, Any], renames: dict[str, str]) -> JobCreate:
    """The JobCreate an OpenAI request is: JobCreate checks every bound (a failure is a 400 naming
    the request's parameter: `renames` maps JobCreate's names to the request's). Fields left None
    keep JobCreate's defaults."""
    try:
        return JobCreate(**{name: value for name, value in fields.items() if value is not None})
    except ValidationError as e:
        message, param = describe_validation_error(e.errors(include_url=False))
        raise in_openai_terms(InvalidRequest(message, param), renames) from e


def in_openai_terms(error: ServiceError, renames: dict[str, str]) -> ServiceError:
    """An error about a JobCreate field as one about the request's parameter it came from."""
    field = (error.param or "").split(".")[0]
    if field not in renames or error.param is None:
        return error
    message = error.message.replace(error.param, renames[field], 1)
    return error.about(renames[field], message)


def prepared_request(
    request: JobCreate, reasoning_effort: str | None, settings: Settings, renames: dict[str, str]
) -> tuple[JobCreate, PreparedPrompt]:
    """The request tokenized (which resolves max_tokens), with the thinking budget its reasoning
    effort asks for (a share of max_tokens)."""
    try:
        prepared = prepare_prompt(request, settings)
    except ServiceError as e:
        raise in_openai_terms(e, renames) from e
    if reasoning_effort is not None and request.max_reasoning_tokens is None:
        budget = int(prepared.max_tokens * REASONING_EFFORT_SHARES[reasoning_effort])
        request = request.model_copy(update={"max_reasoning_tokens": budget})
    return request, prepared


def create_openai_job(
    session: Session,
    key: ApiKey,
    request: JobCreate,
    reasoning_effort: str | None,
    settings: Settings,
    renames: dict[str, str],
    openai_response: dict | None = None,
    charge: RateLimitCharge | None = None,
) -> Job:
    """Queue the job an OpenAI request is (blocking: tokenizes and commits)."""
    request, prepared = prepared_request(request, reasoning_effort, settings, renames)
    job, _ = create_job(
        session, key, request, settings, prepared=prepared, openai_response=openai_response, charge=charge
    )
    return job


def job_samples(job: Job) -> list[Job | SamplePublic]:
    """The samples a job's choices are built from, one choice each: the job's own fields, or with
    n > 1 (the engine's fork of one prompt) its `samples` once it has ended."""
    return [SamplePublic.model_validate(sample) for sample in job.samples] if job.samples else [job]


def unix_time(at: datetime) -> int:
    """A row's time (UTC; naive as SQLite gives it back) as OpenAI's unix seconds."""
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def unfinished_code(job: Job) -> str:
    """The stable name of why a job did not succeed: job_failed, job_cancelled or job_expired."""
    return _UNFINISHED.get(JobStatus(job.status), (JobFailed, "job_failed"))[1]


def job_error(job: Job) -> ServiceError:
    error, code = _UNFINISHED.get(JobStatus(job.status), (JobFailed, "job_failed"))
    detail = f": {job.error}" if job.error else ""
    message = f"job {job.id} {job.status}{detail} (GET /v1/jobs/{job.id} has its partial output)"
    return error(message, headers={"x-should-retry": "false"}, code=code)


async def finished_job(
    redis,
    job: Job,
    is_disconnected: Callable[[], Awaitable[bool]],
    key: ApiKey,
    settings: Settings,
    still_waiting: Callable[[], Awaitable[None]],
) -> Job:
    """Wait for the job's end on its stream (woken at once by its `done`), calling `still_waiting`
    at each event (the wait's slot renews its lease). A client that goes away first has the job
    cancelled: nobody would read it."""
    async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings)):
        await still_waiting()
        if event.kind == "done" and event.job is not None:
            return event.job
        if await is_disconnected():
            await run_shielded(cancel_abandoned, key, job.id, settings)
            raise ClientClosed("the client closed the request; its job was cancelled")
    raise NotFound(f"job {job.id} no longer exists")


async def settled_job(redis, job: Job, seconds: float, settings: Settings) -> Job:
    """The job once it has ended, or as it is after `seconds` (a running job stops at its
    worker's next engine step once cancelled: this waits for that, not for a worker that died)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings), 0.5, after="$"):
                if event.kind == "done" and event.job is not None:
                    return event.job
    return await run_in_threadpool(job_loader(job.id, settings)) or job


def stream_error(error: ServiceError) -> str:
    """The event that ends an OpenAI stream whose job did not succeed: OpenAI's error body."""
    return f"data: {json.dumps(body_of(error), ensure_ascii=False)}\n\n"


def diverged_error(job_id: uuid.UUID) -> ServiceError:
    """A re-run's text changed from what a stream already sent (ponder/service/openai/streamed_text.py)."""
    message = (
        f"job {job_id} was re-run after its worker failed and its text changed from what was sent; "
        f"GET /v1/jobs/{job_id} for the result"
    )
    return JobFailed(message, code="stream_diverged")


def job_loader(job_id: uuid.UUID, settings: Settings) -> Callable[[], Job | None]:
    def load() -> Job | None:
        with Session(sql_engine(settings)) as session:
            return session.get(Job, job_id)

    return load


async def cancel_all(jobs: Sequence[Job], key: ApiKey, settings: Settings) -> None:
    """Cancel jobs nobody will read (their client went away while another of its jobs was awaited)."""
    for job in jobs:
        await run_shielded(cancel_abandoned, key, job.id, settings)


def cancel_abandoned(key: ApiKey, job_id: uuid.UUID, settings: Settings) -> None:
    """Cancel a job whose client went away (the jobs' cancel path: a queued job never runs, a
    running one stops at its next engine step). Blocking, but short: callers on the event loop run
    it with `run_shielded`, so it runs off the loop, and even while the request is torn down."""
    with Session(sql_engine(settings)) as session:
        try:
            cancel_job(session, key, job_id, JobSignals(settings.redis_url).publish_cancel, settings)
            logger.info("job %s cancelled: its OpenAI-compatible client went away", job_id)
        except ServiceError:  # it ended (or went) in the meantime: nothing to cancel
            pass
