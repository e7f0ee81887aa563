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
from functools import partial
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session

from ponder.service.errors import Conflict, NotFound
from ponder.service.function_tools import ToolCallPublic, answer_calls, call_id_of
from ponder.service.job_public import TokenLogprobPublic
from ponder.service.job_rules import cancel_job, get_job
from ponder.service.logprobs import chat_entries, unpack
from ponder.service.openai.common import (
    create_openai_job,
    job_create,
    job_fields,
    job_messages,
    prepared_request,
    settled_job,
    unfinished_code,
    unix_time,
)
from ponder.service.openai.reasoning_items import (
    ItemStatus,
    ReasoningInput,
    ReasoningItem,
    ReasoningRequest,
    ReasoningText,
    check_sealed,
    shown_reasoning,
)
from ponder.service.openai.response_schemas import (
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutput,
    IncompleteDetails,
    InputItem,
    MessageItem,
    OutputItem,
    OutputText,
    ResponseCreate,
    ResponseErrorBody,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)
from ponder.service.prompts import PreparedPrompt, served_tokenizer, served_tool_format
from ponder.service.rate_limits import RateLimitCharge
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import JobSignals
from ponder.service.tables import ApiKey, Job, JobStatus
from ponder.service.threads import run_in_threadpool

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
    check_sealed(body.input, settings)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    fields = job_fields(body, instructions + input_messages(body.input), body.max_output_tokens, settings)
    text_format = body.text.format if body.text is not None else None
    choice = body.tool_choice
    return job_create(
        fields
        | {
            "response_format": text_format and text_format.response_format(),
            "tools": [tool.chat_tool() for tool in body.tools] if body.tools else None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if choice and not isinstance(choice, str)
            else choice,
            "parallel_tool_calls": body.parallel_tool_calls,
            "logprobs": body.wants_logprobs,
            "top_logprobs": body.top_logprobs,
        },
        _RENAMES,
    )


def input_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """The input as chat messages: function_call items are their assistant turn's tool_calls (one
    turn for consecutive calls), a function_call_output a `tool` message. Reasoning items are
    dropped: R1's usage rules say earlier turns' thinking is not fed back."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, ReasoningInput):
            continue
        if isinstance(item, FunctionCallInput):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1]["tool_calls"] = [*(messages[-1].get("tool_calls") or []), call]
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "content": item.output, "tool_call_id": item.call_id})
        else:
            messages += job_messages([item])
    return messages


def shown_request(body: ResponseCreate) -> dict[str, Any]:
    """What the response object shows of its request beyond the job's own (Job.openai_response);
    a job that has it is a response (GET /v1/responses/{id} finds it)."""
    text_format = body.text.format if body.text is not None else None
    return {
        "background": bool(body.background),
        "include": body.include,  # what the output items show (ponder/service/openai/reasoning_items.py)
        "reasoning": body.reasoning.model_dump() if body.reasoning else None,
        "text": {"format": text_format.model_dump(exclude_unset=True)} if text_format is not None else None,
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None,
        "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
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
    return response_object(job, settings)


# -- the response object --------------------------------------------------------------------------


def response_status(job: Job) -> ResponseStatus:
    if job.status == JobStatus.succeeded:
        return "incomplete" if job.finish_reason == "length" else "completed"
    return _STATUSES[job.status]


def response_object(job: Job, settings: Settings) -> ResponseObject:
    """The job as a response object: its output so far, its usage once it has ended."""
    status = response_status(job)
    content: str | None = job.content or ""
    calls: list[ToolCallPublic] = []
    if status == "completed":  # calls are read from a whole answer
        content, calls = answer_calls(
            job.request, content, partial(served_tool_format, settings), call_id_of(job.id, 0)
        )
    return response_shell(job, status).model_copy(
        update={
            "completed_at": unix_time(job.finished_at) if status == "completed" and job.finished_at else None,
            "error": _error(job) if status == "failed" else None,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            "output": _shown(
                output_items(job.reasoning_content or "", content or "", job.id, status, calls), job, settings
            ),
            "usage": ResponseUsage.from_job(job) if job.is_final else None,
        }
    )


def _shown(items: list[OutputItem], job: Job, settings: Settings) -> list[OutputItem]:
    """The items as the request asked to see them: the reasoning's summary and sealed text, the
    message's text with its tokens' values (the answer's: those after the thinking's), for a job
    that keeps them."""
    shown = job.openai_response or {}
    items = [shown_reasoning(item, shown, settings) if isinstance(item, ReasoningItem) else item for item in items]
    message = next((item for item in items if isinstance(item, MessageItem) and item.content), None)
    if message is not None and job.logprobs:
        values = unpack(job.logprobs[0])[job.reasoning_tokens :]
        message.content[0].logprobs = [
            TokenLogprobPublic.model_validate(entry) for entry in chat_entries(values, served_tokenizer(settings))
        ]
    return items


def response_shell(job: Job, status: ResponseStatus) -> ResponseObject:
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
        **{
            name: shown[name]
            for name in ("text", "tools", "tool_choice", "parallel_tool_calls")
            if shown.get(name) is not None
        },
    )


def _error(job: Job) -> ResponseErrorBody:
    why = f": {job.error}" if job.error else ""
    return ResponseErrorBody(code=unfinished_code(job), message=f"job {job.id} {job.status}{why}")


def output_items(
    reasoning: str,
    content: str,
    job_id: uuid.UUID,
    status: ResponseStatus,
    calls: list[ToolCallPublic] = (),  # type: ignore[assignment]
) -> list[OutputItem]:
    """A reasoning item with the thinking (when there is any), then a message with the answer
    (when there is any, and always once completed without calls), then a function_call item a
    call. The last item is in progress while the response is, complete when it completed,
    incomplete when it ended otherwise."""
    last: ItemStatus = "incomplete"
    if status in ("queued", "in_progress", "completed"):
        last = "completed" if status == "completed" else "in_progress"
    items: list[OutputItem] = []
    answered = bool(content) or (status == "completed" and not calls)
    if reasoning:
        items.append(reasoning_item(job_id, reasoning, "completed" if answered or calls else last))
    if answered:
        items.append(message_item(job_id, content, last))
    items += [_function_call_item(job_id, i, call) for i, call in enumerate(calls)]
    return items


def _function_call_item(job_id: uuid.UUID, index: int, call: ToolCallPublic) -> FunctionCallItem:
    return FunctionCallItem(
        id=f"fc_{job_id.hex}_{index}", call_id=call.id, name=call.function.name, arguments=call.function.arguments
    )


def item_id(kind: str, job_id: uuid.UUID) -> str:
    return f"{'rs' if kind == 'reasoning' else 'msg'}_{job_id.hex}"


def reasoning_item(job_id: uuid.UUID, text: str | None, status: ItemStatus) -> ReasoningItem:
    """None text: the item as it opens, with no content part yet."""
    content = [] if text is None else [ReasoningText(text=text)]
    return ReasoningItem(id=item_id("reasoning", job_id), content=content, status=status)


def message_item(job_id: uuid.UUID, text: str | None, status: ItemStatus) -> MessageItem:
    content = [] if text is None else [OutputText(text=text)]
    return MessageItem(id=item_id("message", job_id), content=content, status=status)
