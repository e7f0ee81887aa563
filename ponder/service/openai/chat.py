"""OpenAI's chat completions over Ponder's jobs: every request becomes an ordinary job (the same
queue, usage and /v1/jobs listing), then is answered from the job's row (waiting) or its Redis
stream (chat.completion chunks). A client that goes away before the end has its job cancelled.
What the OpenAI routes share is in ponder/service/openai/common.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import partial

from sqlmodel import Session

from ponder.engine.tool_calls import calls_start
from ponder.service.errors import NotFound
from ponder.service.function_tools import ToolCallPublic, answer_calls, call_id_of, reads_calls
from ponder.service.job_public import LogprobsPublic, SamplePublic, shown_logprobs
from ponder.service.logprobs import chat_entries, unpack
from ponder.service.openai.chat_schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatCompletionMessage,
    ChatUsage,
    ChunkChoice,
)
from ponder.service.openai.common import (
    cancel_abandoned,
    create_openai_job,
    diverged_error,
    job_create,
    job_error,
    job_fields,
    job_loader,
    job_messages,
    job_samples,
    stream_error,
    unix_time,
)
from ponder.service.openai.streamed_text import Diverged, SentLogprobs, SentText, whole_text
from ponder.service.prompts import served_tokenizer, served_tool_format
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import DELTA_TYPES, LOGPROBS_TYPE, read_job_events
from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.service.threads import run_shielded

logger = logging.getLogger("ponder.api")


# -- requests -------------------------------------------------------------------------------------


def job_request(body: ChatCompletionCreate, settings: Settings) -> JobCreate:
    """The JobCreate a chat completion request is."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    fields = job_fields(body, job_messages(body.messages), max_tokens, settings) | {
        "n": body.n,
        "response_format": body.response_format,
        "tools": body.tools,
        "tool_choice": body.tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        **{name: getattr(body, name) for name in SAMPLER_FIELDS},
        "logprobs": body.logprobs,
        "top_logprobs": body.top_logprobs,
    }
    return job_create(fields, chat_renames(body))


# The full sampler's fields, named alike in both bodies (docs/architecture.md, "Sample").
SAMPLER_FIELDS = ("frequency_penalty", "presence_penalty", "logit_bias", "repetition_penalty", "min_p", "min_tokens")


def chat_renames(body: ChatCompletionCreate) -> dict[str, str]:
    """JobCreate's `max_tokens` is the request's max_completion_tokens when that was given."""
    return {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {}


def create_chat_job(
    session: Session, key: ApiKey, body: ChatCompletionCreate, settings: Settings, charge: RateLimitCharge | None = None
) -> Job:
    """Queue the job a chat completion request is (blocking: tokenizes and commits)."""
    request = job_request(body, settings)
    return create_openai_job(session, key, request, body.reasoning_effort, settings, chat_renames(body), charge=charge)


# -- answers --------------------------------------------------------------------------------------


def _choices(job: Job) -> int:
    """How many choices the job will have (known before it ends)."""
    return int(job.request.get("n") or 1)


def chat_completion(job: Job, settings: Settings) -> ChatCompletion:
    """The finished job as a chat.completion; a job that did not succeed is an error."""
    if job.status != JobStatus.succeeded:
        raise job_error(job)
    tool_format = partial(served_tool_format, settings)
    logprobs = shown_logprobs(job.logprobs, served_tokenizer(settings)) or []
    choices = []
    for index, sample in enumerate(job_samples(job)):
        content, calls = answer_calls(job.request, sample.content or "", tool_format, call_id_of(job.id, index))
        message = ChatCompletionMessage(
            content=content,
            reasoning_content=sample.reasoning_content,
            reasoning=sample.reasoning_content,
            tool_calls=calls or None,
        )
        finish_reason = _finish_reason(sample, calls)
        shown = logprobs[index] if index < len(logprobs) else None
        choices.append(ChatChoice(index=index, message=message, finish_reason=finish_reason, logprobs=shown))
    return ChatCompletion(
        id=completion_id(job),
        created=unix_time(job.created_at),
        model=job.model,
        choices=choices,
        usage=ChatUsage.from_job(job),
    )


def _finish_reason(sample: Job | SamplePublic, calls: list[ToolCallPublic]) -> str:
    """`tool_calls` for an answer that made calls and ended by itself, as OpenAI says."""
    finish_reason = sample.finish_reason or "stop"
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def completion_id(job: Job) -> str:
    return f"chatcmpl-{job.id}"


async def chat_completion_chunks(
    redis, job: Job, include_usage: bool, key: ApiKey, settings: Settings
) -> AsyncIterator[str]:
    """The job as chat.completion.chunk server-sent events: the role first, then reasoning deltas
    (as both `reasoning_content` and `reasoning`) and content deltas, a chunk with the
    finish_reason, the usage (with `include_usage`), `[DONE]`. A job that does not succeed ends the
    stream with an error, as OpenAI's does. A client that goes away first has the job cancelled."""
    texts = [SentText() for _ in range(_choices(job))]
    logprobs = [SentLogprobs() for _ in texts] if job.request.get("logprobs") else []
    tokenizer = served_tokenizer(settings)
    tool_format = partial(served_tool_format, settings)
    held_from = calls_start(tool_format()) if reads_calls(job.request) else None

    def chunk(choices: list[ChunkChoice], usage: ChatUsage | None = None) -> str:
        body = ChatCompletionChunk(
            id=completion_id(job), created=unix_time(job.created_at), model=job.model, choices=choices, usage=usage
        )
        return f"data: {body.model_dump_json()}\n\n"

    def deltas(index: int, final: bool = False) -> list[ChunkChoice]:
        unsent = texts[index].unsent(held_from, final)
        reasoning, content = unsent.get("reasoning"), unsent.get("content")
        choices = []
        if reasoning:
            choices.append(ChunkChoice(index=index, delta={"reasoning_content": reasoning, "reasoning": reasoning}))
        if content:
            choices.append(ChunkChoice(index=index, delta={"content": content}))
        if logprobs and (values := logprobs[index].unsent()):
            shown = LogprobsPublic(content=chat_entries(values, tokenizer))
            choices = choices or [ChunkChoice(index=index, delta={})]
            choices[-1].logprobs = shown
        return choices

    ended = False
    try:
        yield chunk([ChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(len(texts))])
        async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings)):
            if event.kind == "keepalive":
                yield ": keepalive\n\n"  # an SSE comment: clients skip it; it keeps proxies from timing out
                continue
            if event.kind == "done":
                final = event.job
                ended = True
                if final is None:
                    yield stream_error(NotFound(f"job {job.id} no longer exists"))
                    return
                finishes = []
                kept = [unpack(values) for values in final.logprobs or []]
                for index, sample in enumerate(job_samples(final)):  # the row's text is the whole text
                    texts[index].end_with(whole_text(sample))
                    if logprobs and index < len(kept):
                        logprobs[index].end_with(kept[index])
                    for choice in deltas(index, final=True):
                        yield chunk([choice])
                    succeeded = final.status == JobStatus.succeeded
                    _, calls = answer_calls(
                        final.request, sample.content if succeeded else None, tool_format, call_id_of(job.id, index)
                    )
                    if calls:
                        yield chunk([ChunkChoice(index=index, delta={"tool_calls": _call_deltas(calls)})])
                    finishes.append(ChunkChoice(index=index, delta={}, finish_reason=_finish_reason(sample, calls)))
                if final.status != JobStatus.succeeded:
                    yield stream_error(job_error(final))
                    return
                yield chunk(finishes)
                if include_usage:
                    yield chunk([], ChatUsage.from_job(final))
                yield "data: [DONE]\n\n"
                return
            one_sample = event.kind in DELTA_TYPES or event.kind == LOGPROBS_TYPE
            touched = [event.data.get("index", 0)] if one_sample else range(len(texts))
            for index in touched:  # a delta is one sample's; a reset or rewind is every sample's
                texts[index].apply(event)
                if logprobs:
                    logprobs[index].apply(event)
                for choice in deltas(index):
                    yield chunk([choice])
    except Diverged:
        ended = True  # the job goes on; its row will have the whole text
        yield stream_error(diverged_error(job.id))
    finally:
        if not ended:  # the client went away (Starlette cancels this generator) or the stream broke
            await run_shielded(cancel_abandoned, key, job.id, settings)


def _call_deltas(calls: list[ToolCallPublic]) -> list[dict]:
    """Each call whole, in one delta: `index` says which call it is, as OpenAI's chunks do."""
    return [{"index": i, **call.model_dump()} for i, call in enumerate(calls)]
