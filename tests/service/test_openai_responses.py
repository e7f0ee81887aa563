"""The Responses API mapping without the stack: requests onto JobCreate, job rows onto response
objects (status, output items, usage), and the numbered events a job's stream becomes, re-runs
included."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from openai.types.responses import (
    ResponseReasoningSummaryPartAddedEvent,
    ResponseReasoningSummaryPartDoneEvent,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseReasoningSummaryTextDoneEvent,
)

from ponder.service.errors import ServiceError, status_code_of
from ponder.service.openai import response_events as openai_responses
from ponder.service.openai.response_events import response_stream
from ponder.service.openai.response_schemas import ResponseCreate
from ponder.service.openai.responses import job_request, response_object
from ponder.service.settings import Settings
from ponder.service.streams import JobEvent
from ponder.service.tables import Job, JobStatus, utcnow

SETTINGS = Settings(model="tiny-llama", _env_file=None)
SUMMARY_EVENTS = (
    ResponseReasoningSummaryPartAddedEvent,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseReasoningSummaryTextDoneEvent,
    ResponseReasoningSummaryPartDoneEvent,
)


def create(**fields) -> ResponseCreate:
    return ResponseCreate(**({"model": "tiny-llama", "input": "hi"} | fields))


def job(status=JobStatus.succeeded, finish_reason="stop", reasoning="think", content="answer", **fields) -> Job:
    return Job(
        api_key_id=uuid.uuid4(),
        model="tiny-llama",
        request={"max_tokens": 24, "temperature": 0.6, "top_p": 1.0},
        prompt_token_ids=[1, 2],
        prompt_tokens=2,
        completion_tokens=5,
        reasoning_tokens=3,
        expires_at=utcnow(),
        finished_at=utcnow() if status not in (JobStatus.queued, JobStatus.running) else None,
        openai_response={"background": True, "reasoning": {"effort": "low"}},
        status=status,
        finish_reason=finish_reason,
        reasoning_content=reasoning,
        content=content,
        **fields,
    )


def test_a_request_maps_onto_job_create():
    request = job_request(
        create(
            instructions="Be brief.",
            input=[
                {"role": "developer", "content": "Terse."},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "x"}],
                },
                {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": "ok"},
                {"role": "user", "content": "c"},
            ],
            max_output_tokens=9,
            stop="x",
            seed=3,
            user="alice",
        ),
        SETTINGS,
    )
    assert [(m.role, m.content) for m in request.messages or []] == [
        ("system", "Be brief."),
        ("system", "Terse."),
        ("user", "a\nb"),
        ("assistant", "ok"),
        ("user", "c"),
    ]
    assert (request.max_tokens, request.stop, request.seed, request.metadata) == (9, ["x"], 3, {"user": "alice"})
    assert request.temperature == 0.6 and request.max_reasoning_tokens is None  # the effort's budget comes later
    assert [m.content for m in job_request(create(input="hi"), SETTINGS).messages or []] == ["hi"]


@pytest.mark.parametrize(
    ("fields", "status", "param", "starts"),
    [
        ({"max_output_tokens": 0}, 400, "max_output_tokens", "max_output_tokens:"),
        ({"input": []}, 400, "input", "input:"),
        ({"top_p": 0}, 400, "top_p", "top_p:"),
        ({"stream_options": {"include_obfuscation": True}}, 400, "stream_options", "stream_options"),
        ({"model": "gpt-4o"}, 404, "model", "the model"),
    ],
)
def test_job_create_bounds_are_errors_in_the_requests_terms(fields, status, param, starts):
    with pytest.raises(ServiceError) as raised:
        job_request(create().model_copy(update=fields) if "model" in fields else create(**fields), SETTINGS)
    assert (status_code_of(raised.value), raised.value.param) == (status, param)
    assert raised.value.message.startswith(starts)


@pytest.mark.parametrize(
    ("status", "finish_reason", "expected", "items"),
    [
        (JobStatus.queued, None, "queued", []),
        (JobStatus.running, None, "in_progress", [("reasoning", "completed"), ("message", "in_progress")]),
        (JobStatus.succeeded, "stop", "completed", [("reasoning", "completed"), ("message", "completed")]),
        (JobStatus.succeeded, "length", "incomplete", [("reasoning", "completed"), ("message", "incomplete")]),
        (JobStatus.failed, "error", "failed", [("reasoning", "completed"), ("message", "incomplete")]),
        (JobStatus.cancelled, "abort", "cancelled", [("reasoning", "completed"), ("message", "incomplete")]),
        (JobStatus.expired, None, "failed", [("reasoning", "completed"), ("message", "incomplete")]),
    ],
)
def test_a_jobs_status_is_its_responses(status, finish_reason, expected, items):
    row = job(status, finish_reason, content="" if status == JobStatus.queued else "answer")
    if status == JobStatus.queued:
        row.reasoning_content = None
    response = response_object(row, SETTINGS)
    assert response.status == expected and response.id == f"resp_{row.id.hex}"
    assert [(item.type, item.status) for item in response.output] == items
    assert (response.usage is None) == (expected in ("queued", "in_progress"))
    assert (response.incomplete_details is not None) == (expected == "incomplete")
    assert (response.completed_at is not None) == (expected == "completed")
    codes = {JobStatus.failed: "job_failed", JobStatus.expired: "job_expired"}
    assert (response.error.code if response.error else None) == codes.get(status)
    assert response.background is True and response.reasoning and response.reasoning.effort == "low"
    assert (response.max_output_tokens, response.temperature, response.top_p) == (24, 0.6, 1.0)


def test_output_items_follow_the_text():
    thinking = response_object(job(JobStatus.succeeded, "length", content=""), SETTINGS)
    assert [(item.type, item.status) for item in thinking.output] == [("reasoning", "incomplete")]
    # Completed with no answer still has its (empty) message; no thinking, no reasoning item.
    done = response_object(job(reasoning="", content=""), SETTINGS)
    assert [(item.type, item.status, item.content[0].text) for item in done.output] == [("message", "completed", "")]
    assert response_object(job(JobStatus.cancelled, "abort", reasoning="", content=""), SETTINGS).output == []


def stream(monkeypatch, row: Job, entries: list[tuple[str, dict]], starting_after=None, on_leave=None) -> list[dict]:
    """The events response_stream sends for a job whose stream has `entries`, then ends as `row`."""

    async def read_job_events(redis, job_id, load_job, *args, **kwargs):
        for kind, data in entries:
            yield JobEvent(kind, data)
        yield JobEvent("done", {}, job=row)

    monkeypatch.setattr(openai_responses, "read_job_events", read_job_events)

    async def collect() -> list[str]:
        return [chunk async for chunk in response_stream(None, row, Settings(), starting_after, on_leave)]

    events = []
    for chunk in asyncio.run(collect()):
        head, data = chunk.strip().split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        events.append(event)
    return events


def deltas(events: list[dict]) -> tuple[str, str]:
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    return reasoning, "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


THINK_THEN_ANSWER = [
    ("reasoning", {"delta": "thi"}),
    ("reasoning", {"delta": "nk"}),
    ("content", {"delta": "ans"}),
    ("content", {"delta": "wer"}),
]


def test_a_stream_opens_fills_and_closes_its_items(monkeypatch):
    row = job()
    events = stream(monkeypatch, row, THINK_THEN_ANSWER)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["output"] == []
    assert deltas(events) == ("think", "answer")
    final = events[-1]["response"]
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final["output"]
    assert {e["output_index"] for e in events if e.get("item_id", "").startswith("msg_")} == {1}
    # A client that saw the first 5 events gets the rest, numbered as before.
    assert stream(monkeypatch, row, THINK_THEN_ANSWER, starting_after=4) == events[5:]


def test_a_rerun_that_writes_the_same_text_again_changes_no_numbered_event(monkeypatch):
    rerun = [
        ("reasoning", {"delta": "think"}),
        ("content", {"delta": "an"}),
        ("rewind", {"reasoning": 5, "content": 0}),  # resumed from a checkpoint before the answer
        ("content", {"delta": "ans"}),
        ("content", {"delta": "wer"}),
    ]
    events = stream(monkeypatch, job(), rerun)
    assert deltas(events) == ("think", "answer")
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["an", "s", "wer"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"


@pytest.mark.parametrize(
    "entries",
    [
        [("reasoning", {"delta": "think"}), ("reset", {}), ("reasoning", {"delta": "other"})],
        # thinking again after the answer began
        [("reasoning", {"delta": "th"}), ("content", {"delta": "a"}), ("reset", {}), ("reasoning", {"delta": "thx"})],
    ],
)
def test_a_rerun_with_other_text_ends_the_stream_with_an_error(monkeypatch, entries):
    events = stream(monkeypatch, job(), entries)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "stream_diverged"
    assert events[-1]["sequence_number"] == len(events) - 1


def test_a_job_with_no_answer_ends_with_an_empty_message_or_none(monkeypatch):
    completed = stream(monkeypatch, job(content=""), THINK_THEN_ANSWER[:2])
    assert completed[-1]["response"]["output"][1]["content"][0]["text"] == ""
    assert [e["type"] for e in completed].count("response.output_item.added") == 2
    cancelled = stream(monkeypatch, job(JobStatus.cancelled, "abort", content=""), THINK_THEN_ANSWER[:2])
    assert cancelled[-1]["type"] == "response.incomplete" and cancelled[-1]["response"]["status"] == "cancelled"
    assert [item["status"] for item in cancelled[-1]["response"]["output"]] == ["incomplete"]


def test_a_client_that_leaves_is_told_of(monkeypatch):
    left = []

    async def read_job_events(redis, job_id, load_job, *args, **kwargs):
        yield JobEvent("reasoning", {"delta": "a"})
        await asyncio.sleep(3600)
        yield JobEvent("done", {})

    monkeypatch.setattr(openai_responses, "read_job_events", read_job_events)

    async def leave_after(n: int) -> None:
        events = response_stream(None, job(), Settings(), on_leave=lambda: left.append(True))
        for _ in range(n):
            await anext(events)
        await events.aclose()

    asyncio.run(leave_after(3))
    assert left == [True]


def test_a_streamed_summary_comes_whole_as_the_reasoning_item_closes(monkeypatch):
    row = job()
    row.openai_response = {"reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"]}
    events = stream(monkeypatch, row, THINK_THEN_ANSWER)
    types = [e["type"] for e in events]
    at = types.index("response.reasoning_summary_part.added")
    assert types[at - 2 : at + 5] == [
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    summary = events[at : at + 4]
    for event, sdk_type in zip(summary, SUMMARY_EVENTS, strict=True):  # as the SDK reads them
        assert sdk_type.model_validate(event).item_id == f"rs_{row.id.hex}"
        assert (event["output_index"], event["summary_index"]) == (0, 0)
    assert (summary[0]["part"]["text"], summary[1]["delta"], summary[2]["text"]) == ("", "think", "think")
    final = events[-1]["response"]["output"]
    assert final[0]["summary"] == [summary[3]["part"]] == [{"type": "summary_text", "text": "think"}]
    assert final[0]["encrypted_content"] and final[1]["type"] == "message"
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == final
