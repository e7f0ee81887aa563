"""/v1/jobs: submit, look up, list, cancel, stream."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator
from sqlmodel import Session

from ponder.api.capacity import SlotStreamingResponse, open_stream, release_session
from ponder.api.deps import CurrentKey, RateLimited, RedisDep, SessionDep, SettingsDep, StreamRedisDep
from ponder.service import job_rules
from ponder.service.db import sql_engine
from ponder.service.job_public import JobDeleted, JobList, JobPublic
from ponder.service.prompts import served_tokenizer
from ponder.service.schemas import JobCreate
from ponder.service.streams import STREAM_ID_PATTERN, JobSignals, check_stream_id, job_events
from ponder.service.tables import Job, JobStatus
from ponder.service.threads import run_in_threadpool

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "The job a repeated Idempotency-Key named"}},
)
def create_job(
    body: JobCreate,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    charge: RateLimited,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Queue a reasoning job; 202 with the job and its Location (429 over the key's rate limits)."""
    job, created = job_rules.create_job(session, key, body, settings, idempotency_key, charge=charge)
    response.headers["Location"] = f"{settings.base_url}/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return JobPublic.of(job, served_tokenizer(settings))


@router.get("", response_model=JobList)
def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    status: JobStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """The caller's jobs, newest first, a page at a time."""
    jobs, next_cursor = job_rules.list_jobs(session, key, status, cursor, limit)
    return JobList(data=[JobPublic.model_validate(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """One job: status, progress, and the result once it is done."""
    return JobPublic.of(job_rules.get_job(session, key, job_id), served_tokenizer(settings))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Cancel a queued job at once, or a running one at its next engine step (partial output kept)."""
    publish_cancel = JobSignals(settings.redis_url).publish_cancel
    job = job_rules.cancel_job(session, key, job_id, publish_cancel, settings)
    return JobPublic.of(job, served_tokenizer(settings))


@router.delete("/{job_id}", response_model=JobDeleted)
async def delete_job(job_id: uuid.UUID, key: CurrentKey, session: SessionDep, settings: SettingsDep) -> JobDeleted:
    """Erase a finished job's prompt and output (request messages or prompt, prompt tokens, content,
    reasoning, answer, samples, vote, checkpoint, error, the output in its webhook payloads) and its
    live stream; its usage stays for billing, and GET still shows its status and usage. A queued or
    running job is 409: cancel it first."""
    job = await run_in_threadpool(job_rules.delete_job, session, key, job_id)
    await run_in_threadpool(JobSignals(settings.redis_url).delete_streams, [job.id])
    return JobDeleted(id=job.id)


@router.get("/{job_id}/stream")
async def stream_job(
    job_id: uuid.UUID,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    redis: RedisDep,
    stream_redis: StreamRedisDep,
    last_event_id: Annotated[str | None, Header(pattern=STREAM_ID_PATTERN), AfterValidator(check_stream_id)] = None,
) -> StreamingResponse:
    """Server-sent events: `reasoning` and `content` deltas, then `done` with status and usage;
    `reset` (a re-run started over) and `rewind` (a re-run resumed: keep that much text). Every
    event from the stream has an `id:`; reconnecting with `Last-Event-ID` continues after it.
    429 beyond PONDER_MAX_STREAMS_PER_KEY open streams of the key. The stream holds no database
    connection: it reads Redis, and the row only in short reads off the event loop."""
    await run_in_threadpool(job_rules.get_job, session, key, job_id)  # 404 before the stream starts
    await release_session(session)
    slot = await open_stream(redis, key.id, settings)

    def load_job() -> Job | None:
        with Session(sql_engine(settings)) as fresh:
            return fresh.get(Job, job_id)

    def final_event(job: Job) -> dict:
        public = JobPublic.model_validate(job)
        return {"status": public.status, "finish_reason": public.finish_reason, "usage": public.usage.model_dump()}

    events = job_events(stream_redis, str(job_id), load_job, final_event, after=last_event_id)
    return SlotStreamingResponse(events, slot, {})
