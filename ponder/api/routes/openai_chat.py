"""/v1/chat/completions (OpenAI's shape): each request is a Ponder job, answered when it ends or
streamed as chat.completion chunks."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from ponder.api.capacity import SlotStreamingResponse, create_for_stream, holding, release_session, release_slot
from ponder.api.deps import CurrentKey, RateLimited, RedisDep, SessionDep, SettingsDep, StreamRedisDep
from ponder.api.errors import BadRequestRoute
from ponder.service.openai import chat, common
from ponder.service.openai.chat_schemas import ChatCompletion, ChatCompletionCreate

router = APIRouter(prefix="/v1/chat", tags=["openai"], route_class=BadRequestRoute)


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion, or chunks with stream"}},
)
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    response: Response,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    redis: RedisDep,
    stream_redis: StreamRedisDep,
    charge: RateLimited,
) -> ChatCompletion | StreamingResponse:
    """OpenAI's chat completion, run as an ordinary job (same queue, usage, /v1/jobs): waits for it
    and answers a `chat.completion`, or with `stream: true` sends `chat.completion.chunk` events
    and `[DONE]`. Closing the connection before the end cancels the job."""
    create = partial(chat.create_chat_job, session, key, body, settings, charge)
    # streamed or waited for, the answer reads the job's stream: it takes one of the key's slots
    job, slot = await create_for_stream(redis, key.id, settings, True, create)
    assert slot is not None  # taken: the answer reads the stream
    await release_session(session)  # what follows reads Redis, and the row only in short reads
    headers = {common.JOB_ID_HEADER: str(job.id)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = chat.chat_completion_chunks(stream_redis, job, include_usage, key, settings)
        return SlotStreamingResponse(chunks, slot, headers)
    response.headers.update(headers)
    release_slot(request)  # waiting holds no thread: it is not work in flight
    async with holding(slot, request) as still_waiting:
        final = await common.finished_job(stream_redis, job, request.is_disconnected, key, settings, still_waiting)
    return chat.chat_completion(final, settings)
