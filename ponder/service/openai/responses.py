"""OpenAI's Responses API over Ponder's jobs: every response is an ordinary job (the same queue,
usage and /v1/jobs listing); its id is the job's (`resp_<job id hex>`), and its object is read
from the job's row, or streamed from the job's Redis stream as Responses events.

Statuses: queued -> queued, running -> in_progress, succeeded -> completed, or incomplete
(`incomplete_details.reason: max_output_tokens`) when it ran out of tokens; failed -> failed,
cancelled -> cancelled, expired (not finished by its deadline) -> failed with `error.code`
job_expired: Ponder ran out of time, not the request out of tokens. Any response may be cancelled,
background or not (OpenAI cancels only background ones): it is a job like any other. (Its
stream ends with `response.incomplete`: the Responses stream has no cancelled event.)

A stream's events are a function of the job's stream: replayed from its start and numbered, the
same job gives the same events with the same sequence numbers, so a client that lost its
connection resumes after the last one it saw (`starting_after`). Only text beyond what was
already sent is sent (ponder/service/openai/streamed_text.py:SentText), so a re-run that writes the same text
again (seeded or greedy sampling) changes no numbered event. Two limits: a client that saw text a
resumed re-run then dropped from the stream (the entries after its checkpoint) numbers differently
from a replay that never saw it; and once the stream expired (PONDER_STREAM_TTL_SECONDS) a replay
comes from the row, in one delta per part."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlmodel import Session

from ponder.service.errors import Conflict, NotFound
from ponder.service.job_rules import cancel_job, get_job
from ponder.service.openai.common import (
    create_openai_job,
    job_create,
    job_fields,
    job_loader,
    job_messages,
    prepared_request,
    settled_job,
    unfinished_code,
    unix_time,
)
from ponder.service.openai.response_schemas import (
    IncompleteDetails,
    ItemStatus,
    MessageItem,
    OutputText,
    ReasoningItem,
    ReasoningRequest,
    ReasoningText,
    ResponseCreate,
    ResponseErrorBody,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)
from ponder.service.openai.streamed_text import Diverged, SentText, whole_text
from ponder.service.prompts import PreparedPrompt
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import JobSignals, read_job_events, sse
from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.service.threads import run_in_threadpool, run_shielded

_RESPONSE_ID = re.compile(r"^resp_([0-9a-f]{32})$")
_RENAMES = {"max_tokens": "max_output_tokens", "messages": "input"}  # JobCreate's names, the request's
_STATUSES: dict[str, ResponseStatus] = {
    JobStatus.queued: "queued",
    JobStatus.running: "in_progress",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
    JobStatus.expired: "failed",
}
CANCEL_WAIT_SECONDS = 10.0  # a cancelled running job ends at its worker's next engine step


# -- ids ------------------------------------------------------------------------------------------


def response_id(job_id: uuid.UUID) -> str:
    return f"resp_{job_id.hex}"


def response_job(session: Session, key: ApiKey, response_id: str) -> Job:
    """The job a response id names; 404 for any other id, and for a job not made as a response."""
    match = _RESPONSE_ID.match(response_id)
    try:
        job = get_job(session, key, uuid.UUID(hex=match.group(1))) if match else None
    except NotFound:  # no such job for this key
        job = None
    if job is None or job.openai_response is None:
        raise NotFound(f"no response {response_id!r}", "response_id")
    return job


# -- requests -------------------------------------------------------------------------------------


def job_request(body: ResponseCreate, settings: Settings) -> JobCreate:
    """The JobCreate a response request is: `instructions` a system message before the input."""
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    fields = job_fields(body, instructions + job_messages(body.input), body.max_output_tokens, settings)
    text_format = body.text.format if body.text is not None else None
    return job_create(fields | {"response_format": text_format and text_format.response_format()}, _RENAMES)


def shown_request(body: ResponseCreate) -> dict[str, Any]:
    """What the response object shows of its request beyond the job's own (Job.openai_response);
    a job that has it is a response (GET /v1/responses/{id} finds it)."""
    text_format = body.text.format if body.text is not None else None
    return {
        "background": bool(body.background),
        "reasoning": body.reasoning.model_dump() if body.reasoning else None,
        "text": {"format": text_format.model_dump(exclude_unset=True)} if text_format is not None else None,
    }


def prepared_response(body: ResponseCreate, settings: Settings) -> tuple[JobCreate, PreparedPrompt]:
    """The request checked and tokenized, with its reasoning effort's thinking budget, without the
    commit (a batch line, ponder/service/openai/batches.py)."""
    effort = body.reasoning.effort if body.reasoning else None
    return prepared_request(job_request(body, settings), effort, settings, _RENAMES)


def create_response_job(
    session: Session, key: ApiKey, body: ResponseCreate, settings: Settings, charge: RateLimitCharge | None = None
) -> Job:
    """Queue the job a response request is (blocking: tokenizes and commits)."""
    request = job_request(body, settings)
    effort = body.reasoning.effort if body.reasoning else None
    return create_openai_job(
        session, key, request, effort, settings, _RENAMES, openai_response=shown_request(body), charge=charge
    )


async def cancel_response(session: Session, key: ApiKey, job: Job, redis, settings: Settings) -> ResponseObject:
    """Cancel the response's job (the jobs' cancel path) and answer its object once it has ended.
    Idempotent: a response that has ended already is answered as it is."""
    try:
        signals = JobSignals(settings.redis_url)
        job = await run_in_threadpool(cancel_job, session, key, job.id, signals.publish_cancel, settings)
    except Conflict:  # it has ended already
        await run_in_threadpool(session.refresh, job)
    if not job.is_final:  # running: it stops at its worker's next engine step
        job = await settled_job(redis, job, CANCEL_WAIT_SECONDS, settings)
    return response_object(job)


# -- the response object --------------------------------------------------------------------------


def response_status(job: Job) -> ResponseStatus:
    if job.status == JobStatus.succeeded:
        return "incomplete" if job.finish_reason == "length" else "completed"
    return _STATUSES[job.status]


def response_object(job: Job) -> ResponseObject:
    """The job as a response object: its output so far, its usage once it has ended."""
    status = response_status(job)
    return _response(job, status).model_copy(
        update={
            "completed_at": unix_time(job.finished_at) if status == "completed" and job.finished_at else None,
            "error": _error(job) if status == "failed" else None,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            "output": output_items(job.reasoning_content or "", job.content or "", job.id, status),
            "usage": ResponseUsage.from_job(job) if job.is_final else None,
        }
    )


def _response(job: Job, status: ResponseStatus) -> ResponseObject:
    """What the response object says from its request alone: the object of the stream's first
    events (no output yet, whatever the row says by the time a stream is replayed)."""
    shown, request = job.openai_response or {}, job.request
    reasoning = shown.get("reasoning")
    return ResponseObject(
        id=response_id(job.id),
        created_at=unix_time(job.created_at),
        status=status,
        background=bool(shown.get("background")),
        max_output_tokens=request.get("max_tokens"),
        metadata=job.meta,
        model=job.model,
        output=[],
        reasoning=ReasoningRequest(**reasoning) if reasoning else None,
        temperature=request.get("temperature"),
        top_p=request.get("top_p"),
        **({"text": shown["text"]} if shown.get("text") else {}),
    )


def _error(job: Job) -> ResponseErrorBody:
    why = f": {job.error}" if job.error else ""
    return ResponseErrorBody(code=unfinished_code(job), message=f"job {job.id} {job.status}{why}")


def output_items(
    reasoning: str, content: str, job_id: uuid.UUID, status: ResponseStatus
) -> list[ReasoningItem | MessageItem]:
    """A reasoning item with the thinking (when there is any), then a message with the answer
    (when there is any, and always once completed). The last item is in progress while the
    response is, complete when it completed, incomplete when it ended otherwise."""
    last: ItemStatus = "incomplete"
    if status in ("queued", "in_progress", "completed"):
        last = "completed" if status == "completed" else "in_progress"
    items: list[ReasoningItem | MessageItem] = []
    answered = bool(content) or status == "completed"
    if reasoning:
        items.append(_reasoning_item(job_id, reasoning, "completed" if answered else last))
    if answered:
        items.append(_message_item(job_id, content, last))
    return items


def _item_id(kind: str, job_id: uuid.UUID) -> str:
    return f"{'rs' if kind == 'reasoning' else 'msg'}_{job_id.hex}"


def _reasoning_item(job_id: uuid.UUID, text: str | None, status: ItemStatus) -> ReasoningItem:
    """None text: the item as it opens, with no content part yet."""
    content = [] if text is None else [ReasoningText(text=text)]
    return ReasoningItem(id=_item_id("reasoning", job_id), content=content, status=status)


def _message_item(job_id: uuid.UUID, text: str | None, status: ItemStatus) -> MessageItem:
    content = [] if text is None else [OutputText(text=text)]
    return MessageItem(id=_item_id("message", job_id), content=content, status=status)


# -- streams --------------------------------------------------------------------------------------


_TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",  # the Responses stream has no cancelled event; the object says cancelled
    "failed": "response.failed",
}


async def response_stream(
    redis, job: Job, settings: Settings, starting_after: int | None = None, on_leave: Callable[[], None] | None = None
) -> AsyncIterator[str]:
    """The response's events as server-sent events, each with its type and sequence number; those
    numbered `starting_after` or less are left out. `on_leave`: called when the client goes away
    before the end (a response that is not in the background has its job cancelled)."""
    number, ended = 0, False
    try:
        async for event in _events(redis, job, settings):
            if event is None:
                yield ": keepalive\n\n"  # an SSE comment: clients skip it; it keeps proxies from timing out
                continue
            if starting_after is None or number > starting_after:
                yield sse(event["type"], {"type": event["type"], "sequence_number": number, **event["fields"]})
            number += 1
        ended = True
    finally:
        if not ended and on_leave is not None:
            await run_shielded(on_leave)


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "fields": fields}


async def _events(redis, job: Job, settings: Settings) -> AsyncIterator[dict[str, Any] | None]:
    """The response's events, unnumbered (None: a keepalive): created and in progress, its output
    items as they open, fill and close, then the event its end is, with the whole object."""
    yield _event("response.created", response=_response(job, "queued").model_dump(mode="json"))
    yield _event("response.in_progress", response=_response(job, "in_progress").model_dump(mode="json"))
    text, items = SentText(), _StreamedItems(job.id)
    try:
        async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings)):
            if event.kind == "keepalive":
                yield None
                continue
            if event.kind == "done":
                if event.job is None:
                    yield _event("error", code="not_found", message=f"job {job.id} no longer exists", param=None)
                    return
                final = response_object(event.job)
                text.end_with(whole_text(event.job))
                for item_event in items.deltas(text.unsent()) + items.finish(final):
                    yield item_event
                yield _event(_TERMINAL_EVENTS[final.status], response=final.model_dump(mode="json"))
                return
            text.apply(event)
            for item_event in items.deltas(text.unsent()):
                yield item_event
    except Diverged:
        message = (
            f"job {job.id} was re-run after its worker failed and its text changed from what was sent; "
            f"GET /v1/responses/{response_id(job.id)} for the result"
        )
        yield _event("error", code="stream_diverged", message=message, param=None)


class _StreamedItems:
    """A response stream's output items: the reasoning item while the thinking comes, then the
    message with the answer; each opened (item added, content part added) before its first delta
    and closed (text done, part done, item done) once the next begins or the response ends."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.job_id = job_id
        self.opened: list[str] = []  # item types, in output order: an item's output_index is its place here
        self.closed: set[str] = set()
        self.text = {"reasoning": "", "message": ""}

    def deltas(self, new: dict[str, str]) -> list[dict[str, Any]]:
        events = []
        if "reasoning" in new:
            if "message" in self.opened:  # thinking again once the answer began: only a re-run that differs
                raise Diverged("reasoning")
            events += self._open("reasoning") + [self._delta("reasoning", new["reasoning"])]
        if "content" in new:
            events += self._close(_reasoning_item(self.job_id, self.text["reasoning"], "completed"))
            events += self._open("message") + [self._delta("message", new["content"])]
        return events

    def finish(self, final: ResponseObject) -> list[dict[str, Any]]:
        """Open what the final object has and the stream has not (an empty answer), close the rest."""
        events = []
        for item in final.output:
            events += self._open(item.type) + self._close(item)
        return events

    def _where(self, kind: str) -> dict[str, Any]:
        return {"item_id": _item_id(kind, self.job_id), "output_index": self.opened.index(kind)}

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind in self.opened:
            return []
        self.opened.append(kind)
        where = self._where(kind)
        if kind == "reasoning":
            item: ReasoningItem | MessageItem = _reasoning_item(self.job_id, None, "in_progress")
            part: ReasoningText | OutputText = ReasoningText(text="")
        else:
            item, part = _message_item(self.job_id, None, "in_progress"), OutputText(text="")
        return [
            _event("response.output_item.added", output_index=where["output_index"], item=item.model_dump(mode="json")),
            _event("response.content_part.added", **where, content_index=0, part=part.model_dump(mode="json")),
        ]

    def _delta(self, kind: str, delta: str) -> dict[str, Any]:
        self.text[kind] += delta
        if kind == "reasoning":
            return _event("response.reasoning_text.delta", **self._where(kind), content_index=0, delta=delta)
        return _event("response.output_text.delta", **self._where(kind), content_index=0, delta=delta, logprobs=[])

    def _close(self, item: ReasoningItem | MessageItem) -> list[dict[str, Any]]:
        kind = item.type
        if kind not in self.opened or kind in self.closed:
            return []
        self.closed.add(kind)
        where, part = self._where(kind), item.content[0]
        if kind == "reasoning":
            text_done = _event("response.reasoning_text.done", **where, content_index=0, text=part.text)
        else:
            text_done = _event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[])
        return [
            text_done,
            _event("response.content_part.done", **where, content_index=0, part=part.model_dump(mode="json")),
            _event("response.output_item.done", output_index=where["output_index"], item=item.model_dump(mode="json")),
        ]
