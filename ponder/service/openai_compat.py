"""OpenAI's chat completions over Ponder's jobs: every request becomes an ordinary job (the same
queue, usage and /v1/jobs listing), then is answered from the job's row (waiting) or its Redis
stream (chat.completion chunks). A client that goes away before the end has its job cancelled.
What the OpenAI routes share (the model check, a request's JobCreate and its errors in the
request's own terms, the thinking budget, waiting, cancelling, following a stream that a re-run
takes text back from) lives here too; ponder/service/openai_responses.py builds /v1/responses on it.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from ponder.service.capacity import run_shielded
from ponder.service.db import get_engine
from ponder.service.errors import ApiError, describe_validation_error, error_body
from ponder.service.jobs import cancel_job, create_job
from ponder.service.models import ApiKey, Job, JobStatus
from ponder.service.openai_schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatCompletionMessage,
    ChatMessage,
    ChatUsage,
    ChunkChoice,
    InputMessage,
    ModelCard,
    ModelList,
)
from ponder.service.prompts import PreparedPrompt, prepare_prompt, served_model
from ponder.service.rate_limits import Admission
from ponder.service.schemas import JobCreate, SamplePublic
from ponder.service.settings import Settings
from ponder.service.streams import DELTA_TYPES, JobEvent, publish_cancel, read_job_events

logger = logging.getLogger("ponder.api")

REASONING_EFFORT_SHARES = {"low": 0.2, "medium": 0.5, "high": 0.8}
# What a job that did not succeed answers, instead of a completion. x-should-retry: false keeps
# OpenAI's SDKs from retrying 409s and 5xx, which would start the whole job again.
_UNFINISHED = {
    JobStatus.failed: (500, "job_failed"),
    JobStatus.cancelled: (409, "job_cancelled"),
    JobStatus.expired: (504, "job_expired"),
}
JOB_ID_HEADER = "x-ponder-job-id"  # on every chat completion: the job it is, at /v1/jobs/{id}
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (only logs and metrics see it)


# -- models ---------------------------------------------------------------------------------------


def model_list(settings: Settings) -> ModelList:
    """The served model: one per deployment (PONDER_MODEL), which every job runs on."""
    model = served_model(settings.model, settings.engine.max_model_len)
    return ModelList(data=[ModelCard(id=settings.model, created=model.created)])


def model_card(settings: Settings, model_id: str) -> ModelCard:
    for card in model_list(settings).data:
        if card.id == model_id:
            return card
    raise _model_not_found(model_id, settings)


def _model_not_found(model_id: str, settings: Settings) -> ApiError:
    message = f"the model {model_id!r} does not exist (this deployment serves {settings.model!r})"
    return ApiError(404, message, "model", code="model_not_found")


# -- requests -------------------------------------------------------------------------------------


def check_model(model: str, settings: Settings) -> None:
    if model != settings.model:
        raise _model_not_found(model, settings)


def with_user(metadata: dict[str, str] | None, user: str | None) -> dict[str, str] | None:
    """OpenAI's `user` is kept in the job's metadata as `user`, unless the metadata has one."""
    if user is None or "user" in (metadata or {}):
        return metadata
    return {**(metadata or {}), "user": user}


def job_messages(messages: Sequence[ChatMessage | InputMessage]) -> list[dict[str, str]]:
    # `developer` is `system` under its newer name; R1's conventions fold either into the first user turn.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]


def job_create(fields: dict[str, Any], renames: dict[str, str]) -> JobCreate:
    """The JobCreate an OpenAI request is: JobCreate checks every bound (a failure is a 400 naming
    the request's parameter: `renames` maps JobCreate's names to the request's). Fields left None
    keep JobCreate's defaults."""
    try:
        return JobCreate(**{name: value for name, value in fields.items() if value is not None})
    except ValidationError as e:
        message, param = describe_validation_error(e.errors(include_url=False))
        raise in_openai_terms(ApiError(400, message, param), renames) from e


def in_openai_terms(error: ApiError, renames: dict[str, str]) -> ApiError:
    """An error about a JobCreate field as one about the request's parameter it came from."""
    field = (error.param or "").split(".")[0]
    if field not in renames or error.param is None:
        return error
    message = error.message.replace(error.param, renames[field], 1)
    return ApiError(error.status_code, message, renames[field], error.headers, error.code)


def prepared_request(
    request: JobCreate, reasoning_effort: str | None, settings: Settings, renames: dict[str, str]
) -> tuple[JobCreate, PreparedPrompt]:
    """The request tokenized (which resolves max_tokens), with the thinking budget its reasoning
    effort asks for (a share of max_tokens)."""
    try:
        prepared = prepare_prompt(request, settings)
    except ApiError as e:
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
    admission: Admission | None = None,
) -> Job:
    """Queue the job an OpenAI request is (blocking: tokenizes and commits)."""
    request, prepared = prepared_request(request, reasoning_effort, settings, renames)
    job, _ = create_job(
        session, key, request, settings, prepared=prepared, openai_response=openai_response, admission=admission
    )
    return job


def job_request(body: ChatCompletionCreate, settings: Settings) -> JobCreate:
    """The JobCreate a chat completion request is."""
    check_model(body.model, settings)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    fields = {
        "messages": job_messages(body.messages),
        "model": body.model,
        "max_tokens": body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop,
        "max_reasoning_tokens": body.max_reasoning_tokens,
        "math": body.math,
        "n": body.n,
        "metadata": with_user(body.metadata, body.user),
    }
    return job_create(fields, chat_renames(body))


def chat_renames(body: ChatCompletionCreate) -> dict[str, str]:
    """JobCreate's `max_tokens` is the request's max_completion_tokens when that was given."""
    return {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {}


def create_chat_job(
    session: Session, key: ApiKey, body: ChatCompletionCreate, settings: Settings, admission: Admission | None = None
) -> Job:
    """Queue the job a chat completion request is (blocking: tokenizes and commits)."""
    request = job_request(body, settings)
    return create_openai_job(
        session, key, request, body.reasoning_effort, settings, chat_renames(body), admission=admission
    )


# -- answers --------------------------------------------------------------------------------------


def _samples(job: Job) -> list[Job | SamplePublic]:
    """The samples a job's choices are built from, one choice each: the job's own fields, or with
    n > 1 (the engine's fork of one prompt) its `samples` once it has ended."""
    return [SamplePublic.model_validate(sample) for sample in job.samples] if job.samples else [job]


def _choices(job: Job) -> int:
    """How many choices the job will have (known before it ends)."""
    return int(job.request.get("n") or 1)


def chat_completion(job: Job) -> ChatCompletion:
    """The finished job as a chat.completion; a job that did not succeed is an error."""
    if job.status != JobStatus.succeeded:
        raise job_error(job)
    choices = [
        ChatChoice(
            index=index,
            message=ChatCompletionMessage(
                content=sample.content or "",
                reasoning_content=sample.reasoning_content,
                reasoning=sample.reasoning_content,
            ),
            finish_reason=sample.finish_reason or "stop",
        )
        for index, sample in enumerate(_samples(job))
    ]
    return ChatCompletion(
        id=completion_id(job),
        created=unix_time(job.created_at),
        model=job.model,
        choices=choices,
        usage=ChatUsage.from_job(job),
    )


def completion_id(job: Job) -> str:
    return f"chatcmpl-{job.id}"


def unix_time(at: datetime) -> int:
    """A row's time (UTC; naive as SQLite gives it back) as OpenAI's unix seconds."""
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def unfinished_code(job: Job) -> str:
    """The stable name of why a job did not succeed: job_failed, job_cancelled or job_expired."""
    return _UNFINISHED.get(JobStatus(job.status), (500, "job_failed"))[1]


def job_error(job: Job) -> ApiError:
    status, code = _UNFINISHED.get(JobStatus(job.status), (500, "job_failed"))
    detail = f": {job.error}" if job.error else ""
    message = f"job {job.id} {job.status}{detail} (GET /v1/jobs/{job.id} has its partial output)"
    return ApiError(status, message, headers={"x-should-retry": "false"}, code=code)


async def finished_job(
    redis, job: Job, is_disconnected: Callable[[], Awaitable[bool]], key: ApiKey, settings: Settings
) -> Job:
    """Wait for the job's end on its stream (woken at once by its `done`). A client that goes away
    first has the job cancelled: nobody would read it."""
    async for event in read_job_events(redis, str(job.id), job_loader(job.id)):
        if event.kind == "done" and event.job is not None:
            return event.job
        if await is_disconnected():
            await run_shielded(cancel_abandoned, key, job.id, settings)
            raise ApiError(CLIENT_CLOSED, "the client closed the request; its job was cancelled")
    raise ApiError(404, f"job {job.id} no longer exists")


async def settled_job(redis, job: Job, seconds: float) -> Job:
    """The job once it has ended, or as it is after `seconds` (a running job stops at its
    worker's next engine step once cancelled: this waits for that, not for a worker that died)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for event in read_job_events(redis, str(job.id), job_loader(job.id), 0.5, after="$"):
                if event.kind == "done" and event.job is not None:
                    return event.job
    return await run_in_threadpool(job_loader(job.id)) or job


async def chat_completion_chunks(
    redis, job: Job, include_usage: bool, key: ApiKey, settings: Settings
) -> AsyncIterator[str]:
    """The job as chat.completion.chunk server-sent events: the role first, then reasoning deltas
    (as both `reasoning_content` and `reasoning`) and content deltas, a chunk with the
    finish_reason, the usage (with `include_usage`), `[DONE]`. A job that does not succeed ends the
    stream with an error, as OpenAI's does. A client that goes away first has the job cancelled."""
    texts = [SentText() for _ in range(_choices(job))]

    def chunk(choices: list[ChunkChoice], usage: ChatUsage | None = None) -> str:
        body = ChatCompletionChunk(
            id=completion_id(job), created=unix_time(job.created_at), model=job.model, choices=choices, usage=usage
        )
        return f"data: {body.model_dump_json()}\n\n"

    def deltas(index: int) -> list[ChunkChoice]:
        unsent = texts[index].unsent()
        reasoning, content = unsent.get("reasoning"), unsent.get("content")
        choices = []
        if reasoning:
            choices.append(ChunkChoice(index=index, delta={"reasoning_content": reasoning, "reasoning": reasoning}))
        if content:
            choices.append(ChunkChoice(index=index, delta={"content": content}))
        return choices

    ended = False
    try:
        yield chunk([ChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(len(texts))])
        async for event in read_job_events(redis, str(job.id), job_loader(job.id)):
            if event.kind == "keepalive":
                yield ": keepalive\n\n"  # an SSE comment: clients skip it; it keeps proxies from timing out
                continue
            if event.kind == "done":
                final = event.job
                ended = True
                if final is None:
                    yield f"data: {_error_json(ApiError(404, f'job {job.id} no longer exists'))}\n\n"
                    return
                for index, sample in enumerate(_samples(final)):  # the row's text is the whole text
                    texts[index].end_with(whole_text(sample))
                    for choice in deltas(index):
                        yield chunk([choice])
                if final.status != JobStatus.succeeded:
                    yield f"data: {_error_json(job_error(final))}\n\n"
                    return
                finishes = [
                    ChunkChoice(index=i, delta={}, finish_reason=sample.finish_reason or "stop")
                    for i, sample in enumerate(_samples(final))
                ]
                yield chunk(finishes)
                if include_usage:
                    yield chunk([], ChatUsage.from_job(final))
                yield "data: [DONE]\n\n"
                return
            touched = [event.data.get("index", 0)] if event.kind in DELTA_TYPES else range(len(texts))
            for index in touched:  # a delta is one sample's; a reset or rewind is every sample's
                texts[index].apply(event)
                for choice in deltas(index):
                    yield chunk([choice])
    except Diverged:
        ended = True  # the job goes on; its row will have the whole text
        message = (
            f"job {job.id} was re-run after its worker failed and its text changed from what was sent; "
            f"GET /v1/jobs/{job.id} for the result"
        )
        yield f"data: {_error_json(ApiError(500, message, code='stream_diverged'))}\n\n"
    finally:
        if not ended:  # the client went away (Starlette cancels this generator) or the stream broke
            await run_shielded(cancel_abandoned, key, job.id, settings)


def _error_json(error: ApiError) -> str:
    return json.dumps(error_body(error.status_code, error.message, error.param, error.code), ensure_ascii=False)


def whole_text(job: Job | SamplePublic) -> dict[str, str]:
    """A finished job's text by kind, as its row has it."""
    return {"reasoning": job.reasoning_content or "", "content": job.content or ""}


class Diverged(Exception):
    """A re-run's text is not an extension of what the chat stream already sent."""


class SentText:
    """One sample's reasoning and content, as its job's stream has them and as a chat stream sent
    them. A job's stream can take text back (a re-run after its worker died: `reset` starts it over,
    `rewind` cuts it back to the checkpoint); chunks cannot. So only text that extends what was
    sent is sent: a seeded or greedy re-run writes the same text again, and the stream goes on
    once it is past what was sent. A re-run whose text differs (sampling without a seed) raises
    `Diverged`."""

    def __init__(self) -> None:
        self.text = {kind: "" for kind in DELTA_TYPES}
        self.sent = {kind: "" for kind in DELTA_TYPES}

    def apply(self, event: JobEvent) -> None:
        if event.kind in DELTA_TYPES:
            self.text[event.kind] += event.data.get("delta", "")
        elif event.kind == "reset":
            self.text = {kind: "" for kind in DELTA_TYPES}
        elif event.kind == "rewind":
            self.text = {kind: text[: int(event.data.get(kind, len(text)))] for kind, text in self.text.items()}

    def end_with(self, text: dict[str, str]) -> None:
        """The whole text, as the job's row has it once it has ended: it must extend what was sent."""
        if any(not text[kind].startswith(sent) for kind, sent in self.sent.items()):
            raise Diverged("the result")
        self.text = text

    def unsent(self) -> dict[str, str]:
        """What to send now, by kind (marked sent)."""
        new = {}
        for kind, text in self.text.items():
            sent = self.sent[kind]
            if not (text.startswith(sent) or sent.startswith(text)):
                raise Diverged(kind)
            if len(text) > len(sent):
                new[kind], self.sent[kind] = text[len(sent) :], text
        return new


# -- the job's life -------------------------------------------------------------------------------


def job_loader(job_id: uuid.UUID) -> Callable[[], Job | None]:
    def load() -> Job | None:
        with Session(get_engine()) as session:
            return session.get(Job, job_id)

    return load


def cancel_abandoned(key: ApiKey, job_id: uuid.UUID, settings: Settings) -> None:
    """Cancel a job whose client went away (the jobs' cancel path: a queued job never runs, a
    running one stops at its next engine step). Blocking, but short: callers on the event loop run
    it with `run_shielded`, so it runs off the loop, and even while the request is torn down."""
    with Session(get_engine()) as session:
        try:
            cancel_job(session, key, job_id, publish_cancel, settings)
            logger.info("job %s cancelled: its OpenAI-compatible client went away", job_id)
        except ApiError:  # it ended in the meantime (409)
            pass
