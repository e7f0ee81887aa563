"""/v1/completions (OpenAI's legacy shape, as lm-evaluation-harness and vLLM's clients use it): each
prompt is a Ponder job, answered when all have ended or streamed as text_completion chunks."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from ponder.api.capacity import SlotStreamingResponse, create_for_stream, holding, release_session, release_slot
from ponder.api.deps import CurrentKey, RateLimited, RedisDep, SessionDep, SettingsDep, StreamRedisDep
from ponder.api.errors import BadRequestRoute
from ponder.service.openai import common, completions
from ponder.service.openai.completion_schemas import Completion, CompletionCreate

router = APIRouter(prefix="/v1", tags=["openai"], route_class=BadRequestRoute)


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "text_completion, or chunks with stream"}},
)
async def create_completion(
    body: CompletionCreate,
    request: Request,
    response: Response,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    redis: RedisDep,
    stream_redis: StreamRedisDep,
    charge: RateLimited,
) -> Completion | StreamingResponse:
    """OpenAI's legacy completion: a job per prompt (same queue, usage, /v1/jobs), answered once all
    have ended, or with `stream: true` as `text_completion` chunks and `[DONE]`. Closing the
    connection before the end cancels the jobs. `x-ponder-job-ids` lists them, in prompt order."""
    create = partial(completions.create_completion_jobs, session, key, body, settings, charge)
    jobs, slot = await create_for_stream(redis, key.id, settings, True, create)
    assert slot is not None  # taken: the answer reads the streams
    await release_session(session)
    headers = {common.JOB_ID_HEADER: str(jobs[0].id), common.JOB_IDS_HEADER: ",".join(str(job.id) for job in jobs)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completions.completion_chunks(stream_redis, jobs, include_usage, key, settings)
        return SlotStreamingResponse(chunks, slot, headers)
    response.headers.update(headers)
    release_slot(request)  # waiting holds no thread: it is not work in flight
    async with holding(slot, request) as still_waiting:
        finals = await completions.finished_jobs(
            stream_redis, jobs, request.is_disconnected, key, settings, still_waiting
        )
    return completions.completion(finals, settings)
