"""/v1/responses through the official `openai` SDK against the real stack: background responses
polled to their end, waiting ones, streams (resumed after a cut, and the SDK's stream helper),
cancelling, the job each response is, reasoning sealed for a later turn (inspect-ai's request) and
summarized, and errors as the SDK raises them.

tiny-llama's chat template opens a thinking block (as R1's does), so everything it writes is
reasoning until `</think>`; a reasoning effort budget forces that tag, so a response has both a
reasoning item and a message. Greedy, it never writes EOS: a response ends by its
max_output_tokens (incomplete) unless a stop string (Ponder's own, in extra_body) ends it."""

from __future__ import annotations

import base64
import time
import uuid

import openai
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from openai import OpenAI
from openai.types.responses import Response
from sqlmodel import Session

from ponder.service.db import database_engine
from ponder.service.encryption import REASONING_KDF_INFO, derived_bytes
from ponder.service.openai.reasoning_items import last_paragraph
from ponder.service.settings import DEFAULT_SECRET
from ponder.service.tables import Job
from tests.stack import SQLITE_ONLY, wait_final

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MODEL = "tiny-llama"
REQUEST = {
    "model": MODEL,
    "input": "Why is the sky blue? Think it through.",
    "max_output_tokens": 24,
    "temperature": 0,
    "reasoning": {"effort": "low"},  # a budget of 24 * 20% = 4 tokens, then </think> and the answer
}
LONG = 2000  # tokens: as many as tiny-llama's context (2048) leaves; a few seconds on a fast machine
LONG_REQUEST = {"model": MODEL, "input": "go on", "max_output_tokens": LONG, "temperature": 0}


def job_id_of(response_id: str) -> str:
    assert response_id.startswith("resp_"), response_id
    return str(uuid.UUID(hex=response_id.removeprefix("resp_")))


def poll(sdk: OpenAI, response_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = sdk.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.2)
    raise AssertionError(f"response {response_id} still {response.status} after {timeout} s")


def texts(response) -> tuple[str, str]:
    """(reasoning, answer) of a response object."""
    reasoning = "".join(part.text for item in response.output if item.type == "reasoning" for part in item.content)
    return reasoning, response.output_text


def streamed(events) -> tuple[str, str]:
    """(reasoning, answer) the deltas of a stream's events add up to."""
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    return reasoning, "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_background_response_is_a_job_polled_to_its_end(stack, sdk):
    created = sdk.responses.create(**REQUEST, background=True, instructions="Be brief.", metadata={"case": "bg"})
    assert created.object == "response" and created.status == "queued" and created.background is True
    assert created.output == [] and created.usage is None and abs(created.created_at - time.time()) < 600

    final = poll(sdk, created.id)
    assert final.id == created.id and final.status == "incomplete"
    # the SDK builds its objects unchecked: check the wire's against its types' required fields
    Response.model_validate(sdk.responses.with_raw_response.retrieve(final.id).http_response.json())
    assert final.incomplete_details.reason == "max_output_tokens" and final.error is None
    assert [item.type for item in final.output] == ["reasoning", "message"]
    reasoning, answer = texts(final)
    assert reasoning and answer and final.output[1].status == "incomplete"
    assert (final.max_output_tokens, final.temperature, final.reasoning.effort) == (24, 0, "low")
    assert final.metadata == {"case": "bg"} and final.background is True
    usage = final.usage
    assert usage.output_tokens == 24 and usage.total_tokens == usage.input_tokens + 24
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens

    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(final.id)}").json()
    assert job["status"] == "succeeded" and job["finish_reason"] == "length" and job["metadata"] == {"case": "bg"}
    assert (job["reasoning_content"], job["content"]) == (reasoning, answer)
    assert job["usage"]["prompt_tokens"] == usage.input_tokens
    assert job["usage"]["cached_tokens"] == usage.input_tokens_details.cached_tokens
    assert job["usage"]["completion_tokens"] == usage.output_tokens
    assert job["usage"]["reasoning_tokens"] == usage.output_tokens_details.reasoning_tokens
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        stored = session.get_one(Job, uuid.UUID(job_id_of(final.id))).request
    assert stored["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (stored["max_tokens"], stored["max_reasoning_tokens"]) == (24, 4)


def test_a_response_waits_for_its_job_and_takes_earlier_turns_back(stack, sdk):
    raw = sdk.responses.with_raw_response.create(**REQUEST, user="alice", store=False)
    first = raw.parse()
    assert job_id_of(first.id) == raw.headers["x-ponder-job-id"]
    assert first.status == "incomplete" and first.background is False and first.usage.output_tokens == 24
    assert sdk.responses.retrieve(first.id).model_dump() == first.model_dump()

    # The output passed back as input: the message is a turn, the reasoning item is dropped (R1's rules).
    turns = [
        {"role": "user", "content": [{"type": "input_text", "text": "Why is the sky blue?"}]},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "developer", "content": "Answer again."},
    ]
    second = sdk.responses.create(model=MODEL, input=turns, max_output_tokens=2)
    assert second.status == "incomplete" and second.usage.output_tokens == 2
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(first.id)}").json()
    assert job["metadata"] == {"user": "alice"}
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        stored = session.get_one(Job, uuid.UUID(job_id_of(second.id))).request
    assert stored["messages"] == [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": first.output_text},
        {"role": "system", "content": "Answer again."},
    ]


def test_a_background_stream_cut_short_resumes_with_the_same_numbers(stack, sdk):
    stream = sdk.responses.create(**(REQUEST | {"max_output_tokens": 48}), background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 6:  # created, in progress, reasoning item and part added, deltas...
            break
    stream.close()
    response_id, last = seen[0].response.id, seen[-1].sequence_number
    assert [e.type for e in seen[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]

    rest = list(sdk.responses.retrieve(response_id, stream=True, starting_after=last))
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    end = events[-1]
    assert end.type == "response.incomplete" and end.response.status == "incomplete"
    final = sdk.responses.retrieve(response_id)  # in the background: leaving did not cancel it
    assert final.model_dump() == end.response.model_dump() and final.usage.output_tokens == 48
    assert streamed(events) == texts(final) and all(texts(final))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.model_dump() for item in done] == [item.model_dump() for item in final.output]

    # Replayed from the start, the stream is the same events with the same numbers; the SDK's
    # helper, resuming, reads it so and leaves out those it saw.
    assert [e.model_dump() for e in sdk.responses.retrieve(response_id, stream=True)] == [
        e.model_dump() for e in events
    ]
    with sdk.responses.stream(response_id=response_id, starting_after=last) as resumed:
        assert [(e.type, e.sequence_number) for e in resumed] == [(e.type, e.sequence_number) for e in rest]


def test_the_sdks_stream_helper_ends_with_the_completed_response(sdk):
    probe = sdk.responses.create(**REQUEST)
    reasoning, answer = texts(probe)
    # A stop string ends the answer early, so the response completes: the first character of the
    # answer, after its second, that no text before it has.
    seen_before = reasoning + "</think>"
    stops = [c for i, c in enumerate(answer) if i >= 2 and c.isascii() and c not in seen_before + answer[:i]]
    stop = next((c for c in stops if c.isprintable()), None)
    assert stop is not None, f"no stop character to choose in {answer!r}"

    with sdk.responses.stream(**REQUEST, extra_body={"stop": [stop]}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.status == "completed" and final.completed_at and final.incomplete_details is None
    assert texts(final) == (reasoning, answer[: answer.index(stop)]) == streamed(events)
    assert [item.status for item in final.output] == ["completed", "completed"]
    assert final.usage.output_tokens < 24
    assert events[-1].type == "response.completed" and events[-1].response.id == final.id
    assert [e.sequence_number for e in events] == list(range(len(events)))
    again = sdk.responses.retrieve(final.id)
    assert (again.status, texts(again), again.usage) == (final.status, texts(final), final.usage)


def test_cancelling_a_running_background_response(stack, sdk):
    created = sdk.responses.create(**LONG_REQUEST, background=True)
    while (running := sdk.responses.retrieve(created.id)).status == "queued":
        time.sleep(0.05)
    assert running.status == "in_progress"

    cancelled = sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.usage.output_tokens < LONG
    assert cancelled.error is None and cancelled.incomplete_details is None
    assert sdk.responses.cancel(created.id).model_dump() == cancelled.model_dump()  # again: the same end
    assert sdk.responses.retrieve(created.id).model_dump() == cancelled.model_dump()
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(created.id)}").json()
    assert job["status"] == "cancelled" and job["finish_reason"] == "abort"
    assert job["usage"]["completion_tokens"] == cancelled.usage.output_tokens

    events = list(sdk.responses.retrieve(created.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert streamed(events) == texts(cancelled)


def test_a_client_that_leaves_a_stream_has_its_job_cancelled(stack, sdk):
    stream = sdk.responses.create(**LONG_REQUEST, stream=True)
    created = next(stream)
    for event in stream:
        if event.type == "response.reasoning_text.delta":
            break  # the job is running and writing
    stream.close()
    with stack.client() as client:
        job = wait_final(client, job_id_of(created.response.id))
    assert job["status"] == "cancelled" and 0 < job["usage"]["completion_tokens"] < LONG


def sealed_under(stack, token: str) -> str:
    """The text a reasoning token opens to under the stack's PONDER_SECRET_KEY's reasoning key
    (AES-256-SIV, HKDF-derived: ponder/service/encryption.py), read here without the service."""
    secret = stack.env.get("PONDER_SECRET_KEY", DEFAULT_SECRET)
    key = derived_bytes(secret, REASONING_KDF_INFO, length=64)
    return AESSIV(key).decrypt(base64.urlsafe_b64decode(token), None).decode()


def test_inspect_ais_request_gets_sealed_reasoning_it_can_pass_back(stack, sdk):
    """inspect-ai's OpenAI provider, as it comes: include reasoning.encrypted_content and store
    false, no reasoning effort (so tiny-llama thinks until it runs out). The sealed reasoning opens
    to the reasoning's text; passed back in a later turn it is accepted (and dropped), altered or
    made under another key it is a 400 naming it."""
    turn = {"role": "user", "content": [{"type": "input_text", "text": "Why is the sky blue? Think it through."}]}
    request = {"model": MODEL, "include": ["reasoning.encrypted_content"], "store": False, "max_output_tokens": 24}
    first = sdk.responses.create(**request, temperature=0.0, input=[turn])
    assert first.status == "incomplete" and [item.type for item in first.output] == ["reasoning"]
    (item,) = first.output
    reasoning, _ = texts(first)
    assert reasoning and item.status == "incomplete" and item.summary == []  # no summary asked for
    assert sealed_under(stack, item.encrypted_content) == reasoning
    assert sdk.responses.retrieve(first.id).model_dump() == first.model_dump()  # the same token read again

    passed_back = item.model_dump(exclude_none=True)
    again = [turn, passed_back, {"role": "user", "content": "Go on."}]
    second = sdk.responses.create(**request, temperature=0.0, input=again)
    assert second.status == "incomplete" and second.output[0].encrypted_content
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        stored = session.get_one(Job, uuid.UUID(job_id_of(second.id))).request
    assert [message["content"] for message in stored["messages"]] == [turn["content"][0]["text"], "Go on."]

    token = item.encrypted_content
    other_key = AESSIV(derived_bytes("another-deployments-key", REASONING_KDF_INFO, length=64))
    for bad in (
        token[:40] + ("B" if token[40] == "A" else "A") + token[41:],
        base64.urlsafe_b64encode(other_key.encrypt(reasoning.encode(), None)).decode(),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.responses.create(**request, input=[turn, passed_back | {"encrypted_content": bad}])
        assert raised.value.param == "input.1.encrypted_content" and raised.value.code == "invalid_encrypted_content"


def test_a_reasoning_summary_is_the_reasonings_last_paragraph(stack, sdk):
    """reasoning.summary (any of auto, concise, detailed): R1 has no summarizer; the summary is the
    reasoning's last paragraph, one summary_text part, once the reasoning has ended: in the waited
    answer, the stream's events (each part whole as the item closes) and its final object alike."""
    summarized = REQUEST | {"reasoning": {"effort": "low", "summary": "auto"}}
    waited = sdk.responses.create(**summarized)
    reasoning, _ = texts(waited)
    item = waited.output[0]
    assert item.type == "reasoning" and item.status == "completed" and item.encrypted_content is None
    assert [(part.type, part.text) for part in item.summary] == [("summary_text", last_paragraph(reasoning))]
    assert item.summary[0].text and reasoning.rstrip().endswith(item.summary[0].text)
    assert waited.reasoning.summary == "auto"

    with sdk.responses.stream(**summarized) as stream:  # the SDK's helper reads the summary's events
        events = list(stream)
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.output[0].summary == item.summary
    assert [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"] == [item.summary[0].text]
    types = [e.type for e in events]
    assert types.index("response.reasoning_summary_part.done") < types.index("response.output_item.done")
    assert sdk.responses.retrieve(final.response.id).model_dump() == final.response.model_dump()


def test_included_logprobs_are_the_answers_tokens(stack, sdk):
    """include message.output_text.logprobs: the message's text comes with its tokens' values (the
    answer's alone, after the thinking's), the same as the chat route gives for those tokens."""
    response = sdk.responses.create(**REQUEST, include=["message.output_text.logprobs"], top_logprobs=2)
    (text,) = [part for item in response.output if item.type == "message" for part in item.content]
    usage = response.usage
    answer_tokens = usage.output_tokens - usage.output_tokens_details.reasoning_tokens
    assert len(text.logprobs) == answer_tokens > 0 and all(len(entry.top_logprobs) == 2 for entry in text.logprobs)
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(response.id)}").json()
    shown = [(entry.token, entry.logprob) for entry in text.logprobs]
    assert shown == [(entry["token"], entry["logprob"]) for entry in job["logprobs"]["content"][-answer_tokens:]]
    # streamed: the message's deltas carry the same values, each once; its text.done all of them
    events = list(
        sdk.responses.create(**REQUEST, include=["message.output_text.logprobs"], top_logprobs=2, stream=True)
    )
    streamed = [
        (e.token, e.logprob) for event in events if event.type == "response.output_text.delta" for e in event.logprobs
    ]
    (done,) = [event for event in events if event.type == "response.output_text.done"]
    assert streamed == [(e.token, e.logprob) for e in done.logprobs] == shown


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": 7}}]}, "tools.0.parameters"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 7}}}}, "text.format"),
        ({"previous_response_id": "resp_0"}, "previous_response_id"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"reasoning": {"effort": "minimal"}}, "reasoning.effort"),
        ({"reasoning": {"summary": "brief"}}, "reasoning.summary"),
        ({"reasoning": {"generate_summary": "always"}}, "reasoning.generate_summary"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
        ({"extra_body": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
        ({"extra_body": {"surprise": True}}, "surprise"),
    ],
)
def test_bad_parameters_are_400s_naming_the_parameter(sdk, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(**(REQUEST | fields))
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error" and error.message
    assert error.param == param, error.body


def test_unknown_responses_keys_and_models_are_the_sdks_errors(stack, sdk):
    chat = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    not_a_response = "resp_" + uuid.UUID(chat.id.removeprefix("chatcmpl-")).hex  # a job, but not a response
    for unknown in ("resp_" + "0" * 32, "nonsense", not_a_response):
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(unknown)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.cancel(unknown)
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.responses.create(**(REQUEST | {"model": "gpt-4o"}))
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    created = sdk.responses.create(**(REQUEST | {"max_output_tokens": 1}), background=True)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.retrieve(created.id, include=["message.output_text.logprobs"])
    assert raised.value.param == "include"
    with OpenAI(base_url=f"{stack.base_url}/v1", api_key="pdr_not-a-real-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.responses.create(**REQUEST)
        with pytest.raises(openai.AuthenticationError):
            wrong.responses.retrieve(created.id)
