"""OpenAI's legacy completions over Ponder's jobs (docs/api.md#legacy-completions). Each prompt of a
request is an ordinary job (the same queue, usage, /v1/jobs listing and rate limits), queued
together or not at all; its output is one text (`split_reasoning` off: the think tags as the model
wrote them, no chat template, the prompt's raw text or token ids as given). Answered from the
jobs' rows once all have ended, or streamed one prompt after another as text_completion chunks. A
client that goes away has every job it left cancelled.

`echo` puts the prompt before the completion; with `logprobs` its tokens' values too (the first
token has none: null, as OpenAI's). `max_tokens: 0` with echo scores the prompt alone: the job
runs one token, which is neither shown nor counted in the completion's usage (the job's usage
counts it: it was computed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from ponder.engine.outputs import TokenLogprob
from ponder.engine.tokenizer import Tokenizer
from ponder.service.errors import InvalidRequest, NotFound
from ponder.service.job_public import SamplePublic
from ponder.service.job_rules import create_jobs
from ponder.service.logprobs import token_text, unpack
from ponder.service.openai.common import (
    cancel_abandoned,
    cancel_all,
    diverged_error,
    finished_job,
    job_create,
    job_error,
    job_loader,
    job_samples,
    prepared_request,
    stream_error,
    unix_time,
    with_user,
)
from ponder.service.openai.completion_schemas import (
    DEFAULT_MAX_TOKENS,
    Completion,
    CompletionChoice,
    CompletionCreate,
    CompletionLogprobs,
    CompletionUsage,
)
from ponder.service.openai.models import check_model
from ponder.service.openai.streamed_text import Diverged, SentLogprobs, SentText, whole_text
from ponder.service.prompts import served_tokenizer
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import DELTA_TYPES, LOGPROBS_TYPE, PROMPT_LOGPROBS_TYPE, read_job_events
from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.service.threads import run_shielded

# The request's names for the JobCreate fields they set.
COMPLETION_RENAMES = {"top_logprobs": "logprobs", "prompt_logprobs": "logprobs"}


def completion_requests(body: CompletionCreate, settings: Settings) -> list[JobCreate]:
    """The JobCreate each prompt is."""
    check_model(body.model, settings)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", "stream_options")
    fields = {
        "model": body.model,
        "max_tokens": max(DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens, 1),
        "logprobs": body.logprobs is not None,
        "top_logprobs": body.logprobs,
        "prompt_logprobs": body.logprobs if body.echo else None,
        "split_reasoning": False,
        "metadata": with_user(None, body.user),
        **{name: getattr(body, name) for name in _PASSED_ON},
    }
    return [job_create(fields | {"prompt": prompt}, COMPLETION_RENAMES) for prompt in body.prompts]


# Named alike in both bodies.
_PASSED_ON = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "top_k",
    "repetition_penalty",
    "min_p",
    "min_tokens",
)


def create_completion_jobs(
    session: Session, key: ApiKey, body: CompletionCreate, settings: Settings, charge: RateLimitCharge | None = None
) -> list[Job]:
    """Queue a job per prompt (blocking: tokenizes and commits); every prompt is checked first."""
    prepared = [
        prepared_request(request, None, settings, COMPLETION_RENAMES) for request in completion_requests(body, settings)
    ]
    return create_jobs(session, key, prepared, settings, charge, {"openai_completion": shown_completion(body)})


def shown_completion(body: CompletionCreate) -> dict[str, Any]:
    """What a job's answer shows that its JobCreate does not say (Job.openai_completion)."""
    return {"echo": bool(body.echo), "scored_only": body.max_tokens == 0}


@dataclass(frozen=True)
class Shown:
    """How a legacy completion's job is answered."""

    echo: bool
    scored_only: bool  # max_tokens 0: the prompt scored alone, the token the job ran not shown
    logprobs: int | None  # alternatives per token; None: no values shown

    @classmethod
    def of(cls, job: Job) -> Shown:
        shown = job.openai_completion or {}
        kept = JobCreate.from_stored(job.request).kept_logprobs
        return cls(bool(shown.get("echo")), bool(shown.get("scored_only")), kept)


def completion_id(jobs: list[Job]) -> str:
    return f"cmpl-{jobs[0].id}"


# -- answers --------------------------------------------------------------------------------------


async def finished_jobs(
    redis,
    jobs: list[Job],
    is_disconnected: Callable[[], Awaitable[bool]],
    key: ApiKey,
    settings: Settings,
    still_waiting: Callable[[], Awaitable[None]],
) -> list[Job]:
    """Wait for the jobs in turn (common.finished_job). A client that leaves has them all
    cancelled; a job that did not succeed ends the wait (its error is the answer: nobody would read
    the others, which are cancelled)."""
    finals: list[Job] = []
    for job in jobs:
        try:
            finals.append(await finished_job(redis, job, is_disconnected, key, settings, still_waiting))
        except BaseException:
            await cancel_all(jobs[len(finals) + 1 :], key, settings)
            raise
        if finals[-1].status != JobStatus.succeeded:
            await cancel_all(jobs[len(finals) :], key, settings)
            break
    return finals


def completion(jobs: list[Job], settings: Settings) -> Completion:
    """The finished jobs as one text_completion; a job that did not succeed is the error."""
    for job in jobs:
        if job.status != JobStatus.succeeded:
            raise job_error(job)
    tokenizer = served_tokenizer(settings)
    choices: list[CompletionChoice] = []
    for job in jobs:
        shown = Shown.of(job)
        prompt = _echoed(job, shown, tokenizer)
        for index, sample in enumerate(job_samples(job)):
            output = _output(job, shown, sample, index)
            text = "".join(values[0] for values in (prompt, output) if values is not None)
            logprobs = _legacy(prompt, output, tokenizer) if shown.logprobs is not None else None
            choice_index = len(choices)
            choices.append(
                CompletionChoice(index=choice_index, text=text, logprobs=logprobs, finish_reason=sample.finish_reason)
            )
    return Completion(
        id=completion_id(jobs),
        created=unix_time(jobs[0].created_at),
        model=jobs[0].model,
        choices=choices,
        usage=usage_of(jobs),
    )


def usage_of(jobs: list[Job]) -> CompletionUsage:
    prompt = sum(job.prompt_tokens for job in jobs)
    completion_tokens = sum(job.completion_tokens for job in jobs if not Shown.of(job).scored_only)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
    )


# (text, first token's id, values) of one part of a choice: the echoed prompt, or the output
Part = tuple[str, int | None, list[TokenLogprob]]


def _echoed(job: Job, shown: Shown, tokenizer: Tokenizer) -> Part | None:
    if not shown.echo:
        return None
    prompt = job.request.get("prompt")
    text = prompt if isinstance(prompt, str) else tokenizer.decode(job.prompt_token_ids, skip_special_tokens=False)
    values = unpack(job.prompt_logprobs) if job.prompt_logprobs else []
    return text, job.prompt_token_ids[0] if job.prompt_token_ids else None, values


def _output(job: Job, shown: Shown, sample: Job | SamplePublic, index: int) -> Part | None:
    if shown.scored_only:  # the token the job ran is not shown
        return None
    values = unpack(job.logprobs[index]) if job.logprobs and index < len(job.logprobs) else []
    return sample.content or "", None, values


def _legacy(prompt: Part | None, output: Part | None, tokenizer: Tokenizer) -> CompletionLogprobs:
    """OpenAI's legacy logprobs over the echoed prompt's tokens (its first has no value) and the output's."""
    entries: list[tuple[int, float | None, dict[str, float] | None]] = []
    if prompt is not None and prompt[1] is not None:
        entries.append((prompt[1], None, None))
    for part in (prompt, output):
        for value in part[2] if part is not None else []:
            top = {token_text(token, tokenizer): logprob for token, logprob in value.top}
            if value.logprob is not None:
                top.setdefault(token_text(value.token_id, tokenizer), value.logprob)
            entries.append((value.token_id, value.logprob, top))
    tokens = [token_text(token, tokenizer) for token, _, _ in entries]
    offsets = [sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[logprob for _, logprob, _ in entries],
        top_logprobs=[top for _, _, top in entries],
        text_offset=offsets,
    )


# -- streams --------------------------------------------------------------------------------------


async def completion_chunks(
    redis, jobs: list[Job], include_usage: bool, key: ApiKey, settings: Settings
) -> AsyncIterator[str]:
    """The jobs as text_completion chunks, one prompt after another (its choices' text and values
    as they come, then each choice's finish_reason), the usage with `include_usage`, `[DONE]`. A
    job that does not succeed ends the stream with an error, as OpenAI's does."""
    tokenizer = served_tokenizer(settings)
    ended: set = set()
    finals: list[Job] = []
    try:
        first_choice = 0
        for job in jobs:
            async for chunk in _job_chunks(redis, job, first_choice, tokenizer, settings, finals):
                yield chunk
            ended.add(job.id)
            if len(finals) < len(ended):  # it did not succeed: the error ended the stream
                return
            first_choice += int(job.request.get("n") or 1)
        if include_usage:
            yield _chunk(jobs, [], usage_of(finals))
        yield "data: [DONE]\n\n"
    finally:  # a client that went away (Starlette cancels this generator) leaves no job running
        for job in jobs:
            if job.id not in ended:
                await run_shielded(cancel_abandoned, key, job.id, settings)


async def _job_chunks(
    redis, job: Job, first_choice: int, tokenizer: Tokenizer, settings: Settings, finals: list[Job]
) -> AsyncIterator[str]:
    """One job's chunks; `finals` gets its row once it succeeded."""
    n, shown = int(job.request.get("n") or 1), Shown.of(job)
    texts, values = [SentText() for _ in range(n)], [SentLogprobs() for _ in range(n)]
    echo = _echoed(job, shown, tokenizer)
    echo_waits = echo is not None and shown.logprobs is not None  # for the prompt's values

    def chunk(index: int, text: str, logprobs: list[TokenLogprob], finish_reason: str | None = None) -> str:
        legacy = _legacy(None, ("", None, logprobs), tokenizer) if shown.logprobs is not None else None
        choice = CompletionChoice(index=first_choice + index, text=text, logprobs=legacy, finish_reason=finish_reason)
        return _chunk([job], [choice])

    def echoed(prompt_values: list[TokenLogprob] | None) -> list[str]:
        assert echo is not None
        part = (echo[0], echo[1], prompt_values or [])
        legacy = _legacy(part, None, tokenizer) if shown.logprobs is not None else None
        return [
            _chunk([job], [CompletionChoice(index=first_choice + i, text=echo[0], logprobs=legacy, finish_reason=None)])
            for i in range(n)
        ]

    def news(index: int) -> list[str]:
        unsent = texts[index].unsent()
        text = unsent.get("content", "")
        new_values = values[index].unsent() if shown.logprobs is not None else []
        return [chunk(index, text, new_values)] if not shown.scored_only and (text or new_values) else []

    if echo is not None and not echo_waits:
        for sent in echoed(None):
            yield sent
    try:
        async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings)):
            if event.kind == "keepalive":
                yield ": keepalive\n\n"
                continue
            if event.kind == PROMPT_LOGPROBS_TYPE and echo_waits:
                echo_waits = False
                for sent in echoed(unpack(event.data["delta"])):
                    yield sent
                continue
            if event.kind == "done":
                final = event.job
                if final is None or final.status != JobStatus.succeeded:
                    error = job_error(final) if final else NotFound(f"job {job.id} no longer exists")
                    yield stream_error(error)
                    return
                if echo_waits:
                    for sent in echoed(unpack(final.prompt_logprobs) if final.prompt_logprobs else []):
                        yield sent
                kept = [unpack(packed) for packed in final.logprobs or []]
                for index, sample in enumerate(job_samples(final)):
                    texts[index].end_with(whole_text(sample))
                    if index < len(kept):
                        values[index].end_with(kept[index])
                    for sent in news(index):
                        yield sent
                    yield chunk(index, "", [], sample.finish_reason)
                finals.append(final)
                return
            touched = [event.data.get("index", 0)] if event.kind in (*DELTA_TYPES, LOGPROBS_TYPE) else range(n)
            for index in touched:
                texts[index].apply(event)
                values[index].apply(event)
                if not echo_waits:
                    for sent in news(index):
                        yield sent
    except Diverged:
        yield stream_error(diverged_error(job.id))


def _chunk(jobs: list[Job], choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> str:
    body = Completion(
        id=completion_id(jobs), created=unix_time(jobs[0].created_at), model=jobs[0].model, choices=choices, usage=usage
    )
    return f"data: {body.model_dump_json()}\n\n"
