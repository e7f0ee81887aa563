"""A response's events (`/v1/responses` with `stream`, and `GET /v1/responses/{id}?stream=true`):
created and in progress, its output items as they open, fill and close, then the event its end
is. Only text beyond what was already sent is sent (ponder/service/openai/streamed_text.py:SentText),
so a re-run that writes the same text again changes no numbered event; a response with tools
holds its content back from where calls may start, and sends each call whole at the end. A
reasoning summary is known once the reasoning has ended (ponder/service/openai/reasoning_items.py):
its part's events come whole as the reasoning item closes. With include message.output_text.logprobs
the answer's tokens' values go with the message's deltas, each once (those that come after their
text, as a job's stream writes them, in a delta of no text), and all of them in its text.done."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ponder.engine.reasoning import THINK_END
from ponder.engine.tool_calls import calls_start
from ponder.service.function_tools import reads_calls
from ponder.service.logprobs import chat_entries, unpack
from ponder.service.openai.common import job_loader
from ponder.service.openai.reasoning_items import ReasoningItem, ReasoningText, shown_reasoning
from ponder.service.openai.response_schemas import FunctionCallItem, MessageItem, OutputText, ResponseObject
from ponder.service.openai.responses import (
    item_id,
    message_item,
    reasoning_item,
    response_id,
    response_object,
    response_shell,
)
from ponder.service.openai.streamed_text import Diverged, SentAnswerLogprobs, SentText, whole_text
from ponder.service.prompts import served_tokenizer, served_tool_format
from ponder.service.settings import Settings
from ponder.service.streams import read_job_events, sse
from ponder.service.tables import Job
from ponder.service.threads import run_shielded

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
    yield _event("response.created", response=response_shell(job, "queued").model_dump(mode="json"))
    yield _event("response.in_progress", response=response_shell(job, "in_progress").model_dump(mode="json"))
    text, items = SentText(), _StreamedItems(job, settings)
    held_from = calls_start(served_tool_format(settings)) if reads_calls(job.request) else None
    try:
        async for event in read_job_events(redis, str(job.id), job_loader(job.id, settings)):
            if event.kind == "keepalive":
                yield None
                continue
            if event.kind == "done":
                if event.job is None:
                    yield _event("error", code="not_found", message=f"job {job.id} no longer exists", param=None)
                    return
                final = response_object(event.job, settings)
                text.end_with(whole_text(event.job))
                if items.values is not None:
                    kept = unpack(event.job.logprobs[0]) if event.job.logprobs else []
                    items.values.end_with(kept, event.job.reasoning_tokens)
                for item_event in items.deltas(text.unsent(held_from, final=True)) + items.finish(final):
                    yield item_event
                yield _event(_TERMINAL_EVENTS[final.status], response=final.model_dump(mode="json"))
                return
            text.apply(event)
            if items.values is not None:
                items.values.apply(event)
            for item_event in items.deltas(text.unsent(held_from)):
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

    def __init__(self, job: Job, settings: Settings) -> None:
        self.job_id: uuid.UUID = job.id
        self.shown, self.settings = job.openai_response or {}, settings
        self.opened: list[str] = []  # item types, in output order: an item's output_index is its place here
        self.closed: set[str] = set()
        self.text = {"reasoning": "", "message": ""}
        self.tokenizer = served_tokenizer(settings)
        # include message.output_text.logprobs: the answer's values, sent with the message's deltas
        self.values = (
            SentAnswerLogprobs(self.tokenizer.encode(THINK_END, add_special_tokens=False))
            if job.request.get("logprobs")
            else None
        )

    def deltas(self, new: dict[str, str]) -> list[dict[str, Any]]:
        events = []
        if "reasoning" in new:
            if "message" in self.opened:  # thinking again once the answer began: only a re-run that differs
                raise Diverged("reasoning")
            events += self._open("reasoning") + [self._delta("reasoning", new["reasoning"])]
        if "content" in new:
            ended = reasoning_item(self.job_id, self.text["reasoning"], "completed")
            events += self._close(shown_reasoning(ended, self.shown, self.settings))
            events += self._open("message") + [self._delta("message", new["content"])]
        elif "message" in self.opened and "message" not in self.closed and (values := self._unsent_values()):
            events.append(self._delta("message", "", values))  # values that came after their text
        return events

    def _unsent_values(self) -> list[dict[str, Any]]:
        if self.values is None:
            return []
        new = self.values.unsent(thinking="reasoning" in self.opened)
        return chat_entries(new, self.tokenizer)

    def finish(self, final: ResponseObject) -> list[dict[str, Any]]:
        """Open what the final object has and the stream has not (an empty answer), close the
        rest; then each function call, whole (its arguments in one delta)."""
        events = []
        for item in final.output:
            if isinstance(item, FunctionCallItem):
                events += self._call(item)
            else:
                events += self._open(item.type) + self._close(item)
        return events

    def _call(self, item: FunctionCallItem) -> list[dict[str, Any]]:
        self.opened.append(item.id)
        where = {"item_id": item.id, "output_index": len(self.opened) - 1}
        added = item.model_copy(update={"arguments": "", "status": "in_progress"})
        return [
            _event(
                "response.output_item.added", output_index=where["output_index"], item=added.model_dump(mode="json")
            ),
            _event("response.function_call_arguments.delta", **where, delta=item.arguments),
            _event("response.function_call_arguments.done", **where, arguments=item.arguments, name=item.name),
            _event("response.output_item.done", output_index=where["output_index"], item=item.model_dump(mode="json")),
        ]

    def _where(self, kind: str) -> dict[str, Any]:
        return {"item_id": item_id(kind, self.job_id), "output_index": self.opened.index(kind)}

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind in self.opened:
            return []
        self.opened.append(kind)
        where = self._where(kind)
        if kind == "reasoning":
            item: ReasoningItem | MessageItem = reasoning_item(self.job_id, None, "in_progress")
            part: ReasoningText | OutputText = ReasoningText(text="")
        else:
            item, part = message_item(self.job_id, None, "in_progress"), OutputText(text="")
        return [
            _event("response.output_item.added", output_index=where["output_index"], item=item.model_dump(mode="json")),
            _event("response.content_part.added", **where, content_index=0, part=part.model_dump(mode="json")),
        ]

    def _delta(self, kind: str, delta: str, values: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        self.text[kind] += delta
        if kind == "reasoning":
            return _event("response.reasoning_text.delta", **self._where(kind), content_index=0, delta=delta)
        values = self._unsent_values() if values is None else values
        return _event("response.output_text.delta", **self._where(kind), content_index=0, delta=delta, logprobs=values)

    def _close(self, item: ReasoningItem | MessageItem) -> list[dict[str, Any]]:
        kind = item.type
        if kind not in self.opened or kind in self.closed:
            return []
        self.closed.add(kind)
        where, part = self._where(kind), item.content[0]
        if kind == "reasoning":
            text_done = _event("response.reasoning_text.done", **where, content_index=0, text=part.text)
        else:
            values = [entry.model_dump(mode="json") for entry in getattr(part, "logprobs", [])]
            text_done = _event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=values)
        return [
            text_done,
            _event("response.content_part.done", **where, content_index=0, part=part.model_dump(mode="json")),
            *(self._summary(item) if isinstance(item, ReasoningItem) else []),
            _event("response.output_item.done", output_index=where["output_index"], item=item.model_dump(mode="json")),
        ]

    def _summary(self, item: ReasoningItem) -> list[dict[str, Any]]:
        """The summary's parts, each whole (added empty, one delta, done)."""
        events = []
        for index, part in enumerate(item.summary):
            where = self._where("reasoning") | {"summary_index": index}
            events += [
                _event("response.reasoning_summary_part.added", **where, part={"type": part.type, "text": ""}),
                _event("response.reasoning_summary_text.delta", **where, delta=part.text),
                _event("response.reasoning_summary_text.done", **where, text=part.text),
                _event("response.reasoning_summary_part.done", **where, part=part.model_dump(mode="json")),
            ]
        return events
