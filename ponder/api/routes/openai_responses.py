"""/v1/responses (OpenAI's Responses API): each response is a Ponder job, answered when it ends,
at once in the background (then polled), or streamed as Responses events (resumable)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from ponder.api.capacity import (
    SlotStreamingResponse,
    create_for_stream,
    holding,
    open_stream,
    release_session,
    release_slot,
)
from ponder.api.deps import CurrentKey, RateLimited, RedisDep, SessionDep, SettingsDep, StreamRedisDep
from ponder.api.errors import BadRequestRoute
from ponder.service.errors import InvalidRequest
from ponder.service.openai import common, response_events, responses
from ponder.service.openai.response_schemas import ResponseCreate, ResponseObject
from ponder.service.threads import run_in_threadpool

router = APIRouter(prefix="/v1/responses", tags=["openai"], route_class=BadRequestRoute)

_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "the response, or its events with stream"}
}


@router.post("", response_model=ResponseObject, responses=_STREAMED)
async def create_response(
    body: ResponseCreate,
    request: Request,
    response: Response,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    redis: RedisDep,
    stream_redis: StreamRedisDep,
    charge: RateLimited,
) -> ResponseObject | StreamingResponse:
    """OpenAI's response, run as an ordinary job (same queue, usage, /v1/jobs). `background`:
    answered at once, queued, to be polled; else it waits for the job's end, or with `stream`
    sends its events. A client that goes away first has the job cancelled, unless in the background."""
    create = partial(responses.create_response_job, session, key, body, settings, charge)
    # streamed or waited for, the answer reads the job's stream: it takes one of the key's slots
    reads_stream = bool(body.stream) or not body.background
    job, slot = await create_for_stream(redis, key.id, settings, reads_stream, create)
    await release_session(session)  # what follows reads Redis, and the row only in short reads
    headers = {common.JOB_ID_HEADER: str(job.id)}
    if slot is not None and body.stream:
        leave = None if body.background else partial(common.cancel_abandoned, key, job.id, settings)
        events = response_events.response_stream(stream_redis, job, settings, on_leave=leave)
        return SlotStreamingResponse(events, slot, headers)
    response.headers.update(headers)
    if slot is None:  # in the background: answered at once
        return responses.response_object(job, settings)
    release_slot(request)  # waiting holds no thread: it is not work in flight
    async with holding(slot, request) as still_waiting:
        final = await common.finished_job(stream_redis, job, request.is_disconnected, key, settings, still_waiting)
    return responses.response_object(final, settings)


@router.get("/{response_id}", response_model=ResponseObject, responses=_STREAMED)
async def retrieve_response(
    response_id: str,
    response: Response,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    redis: RedisDep,
    stream_redis: StreamRedisDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0, description="With stream: the events after this one")] = None,
    # OpenAI's SDK sends lists as include[]=...
    include: Annotated[
        list[str], Query(alias="include[]", description="Refused: the response shows what its create request included")
    ] = [],  # noqa: B006
    include_obfuscation: Annotated[bool | None, Query(description="Accepted, not used")] = None,
) -> ResponseObject | StreamingResponse:
    """The response as it is now; with `stream=true` its events from the start (or after
    `starting_after`), numbered as they were the first time, then on to its end."""
    if include:
        raise InvalidRequest(
            "include is set when the response is created, and the response shows what it included", "include"
        )
    if starting_after is not None and not stream:
        raise InvalidRequest("starting_after is only allowed with stream=true", "starting_after")
    job = await run_in_threadpool(responses.response_job, session, key, response_id)
    headers = {common.JOB_ID_HEADER: str(job.id)}
    if stream:
        await release_session(session)
        slot = await open_stream(redis, key.id, settings)
        events = response_events.response_stream(stream_redis, job, settings, starting_after)
        return SlotStreamingResponse(events, slot, headers)
    response.headers.update(headers)
    return responses.response_object(job, settings)


@router.post("/{response_id}/cancel", response_model=ResponseObject)
async def cancel_response(
    response_id: str,
    response: Response,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    stream_redis: StreamRedisDep,
) -> ResponseObject:
    """Cancel the response (its job: a queued one never runs, a running one stops at its next
    engine step) and answer it once it has ended. A response that has ended already is answered
    as it is."""
    job = await run_in_threadpool(responses.response_job, session, key, response_id)
    response.headers[common.JOB_ID_HEADER] = str(job.id)
    return await responses.cancel_response(session, key, job, stream_redis, settings)
