"""OpenAI's Files and Batch APIs through the official `openai` SDK against the real stack: a batch's
lines are ordinary jobs (in /v1/jobs, answered as the chat route answers), a refused line fails
alone, an invalid file fails the batch, a cancel keeps what was done, batch jobs wait behind
direct ones, and another key sees none of it."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from sqlalchemy import update
from sqlmodel import Session, col

from ponder.service.db import database_engine
from ponder.service.tables import Batch, Job
from tests.stack import ponder, wait_final

MODEL = "tiny-llama"
URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"
WAIT = 240  # seconds: a busy machine's backlog of other tests' jobs comes first


@pytest.fixture
def sdk(stack):
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture
def other_sdk(stack):
    key = ponder(["keys", "create", "--name", "batch-other"], stack.env).stdout.strip().splitlines()[-1]
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    yield client
    client.close()


def request_line(custom_id: str, content: str = "Count to three.", **body) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    } | body
    return {"custom_id": custom_id, "method": "POST", "url": URL, "body": body}


def upload(sdk: OpenAI, lines: list[dict] | str) -> str:
    text = lines if isinstance(lines, str) else "".join(json.dumps(line) + "\n" for line in lines)
    return sdk.files.create(file=("input.jsonl", text.encode()), purpose="batch").id


def run_batch(sdk: OpenAI, lines: list[dict] | str, endpoint: str = URL, **fields):
    return sdk.batches.create(input_file_id=upload(sdk, lines), endpoint=endpoint, completion_window="24h", **fields)


def wait_batch(sdk: OpenAI, batch_id: str, until=("completed", "failed", "expired", "cancelled")):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {WAIT} s")


def file_lines(sdk: OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_runs_each_line_as_a_job_and_a_refused_line_fails_alone(stack, sdk):
    questions = ["Count to three.", "Name a colour.", "Say hello."]
    lines = [request_line(f"q{i}", q) for i, q in enumerate(questions)]
    lines.insert(2, request_line("bad", temperature=5))  # refused, as the chat route would: 400
    batch = run_batch(sdk, lines, metadata={"run": "e2e"})
    assert (batch.object, batch.status, batch.endpoint, batch.completion_window) == ("batch", "validating", URL, "24h")
    assert batch.id.startswith("batch_") and batch.metadata == {"run": "e2e"}
    assert batch.expires_at - batch.created_at == 24 * 3600

    done = wait_batch(sdk, batch.id)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, 3, 1)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert sdk.batches.list(limit=100).data[0].id == batch.id
    # Validated and finalized by the batches worker: beat's maintenance never waits behind a batch.
    for task in ("ponder.validate_batch[", "ponder.advance_batches["):
        assert task in stack.log("batches-worker") and task not in stack.log("beat")

    output = file_lines(sdk, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
    (error,) = file_lines(sdk, done.error_file_id)
    assert error["custom_id"] == "bad" and error["error"] is None
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "temperature"

    with stack.client() as client:
        listed = {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        for line in output:
            assert line["error"] is None and line["id"].startswith("batch_req_")
            body = line["response"]["body"]
            assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
            ChatCompletion.model_validate(body)  # the SDK's own type, checked
            job_id = body["id"].removeprefix("chatcmpl-")
            assert job_id in listed  # an ordinary job
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded" and body["choices"][0]["message"]["content"] == job["content"]
            assert body["usage"]["completion_tokens"] == job["usage"]["completion_tokens"]
    # The chat route answers the same request with the same completion (greedy sampling).
    first = next(line for line in output if line["custom_id"] == "q0")["response"]["body"]
    direct = sdk.chat.completions.with_raw_response.create(**lines[0]["body"]).http_response.json()
    for body in (first, direct):
        for name in ("id", "created"):
            body.pop(name)
        body["usage"]["prompt_tokens_details"].pop("cached_tokens")  # the second run hits the prefix cache
    assert first == direct

    output_file = sdk.files.retrieve(done.output_file_id)
    assert (output_file.purpose, output_file.filename) == ("batch_output", f"{batch.id}_output.jsonl")
    assert output_file.bytes == len(sdk.files.content(done.output_file_id).content)
    assert done.input_file_id in {f.id for f in sdk.files.list(purpose="batch")}
    assert sdk.files.delete(done.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(done.input_file_id)
    assert sdk.batches.retrieve(batch.id).status == "completed"  # its input may go; the batch stays


def response_line(custom_id: str, text: str, **body_fields) -> dict:
    # a thinking budget (low: 20% of 16) so that tiny-llama closes its thinking and answers
    body = {"model": MODEL, "input": text, "max_output_tokens": 16, "temperature": 0, "reasoning": {"effort": "low"}}
    body |= body_fields
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES_URL, "body": body}


def test_a_batch_of_responses_answers_each_line_as_the_responses_route_would(stack, sdk):
    sealed = {"include": ["reasoning.encrypted_content"], "reasoning": {"effort": "low", "summary": "auto"}}
    lines = [
        response_line("r0", "Count to three.", **sealed),
        response_line("r1", "Name a colour.", instructions="Be brief."),
    ]
    lines.append(response_line("too-long", "Hi.", max_output_tokens=10**9))  # refused alone, in its own terms
    done = wait_batch(sdk, run_batch(sdk, lines, endpoint=RESPONSES_URL).id)
    assert (done.status, done.endpoint) == ("completed", RESPONSES_URL), done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    (error,) = file_lines(sdk, done.error_file_id)
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "max_output_tokens"

    output = {line["custom_id"]: line for line in file_lines(sdk, done.output_file_id)}
    assert sorted(output) == ["r0", "r1"]
    for line in output.values():
        assert line["error"] is None and line["response"]["status_code"] == 200
        answered = Response.model_validate(line["response"]["body"])  # the SDK's own type
        assert answered.status in ("completed", "incomplete") and answered.output_text
        stored = sdk.responses.retrieve(answered.id)  # a batch line's response is a response like any other
        assert (stored.status, stored.output_text) == (answered.status, answered.output_text)
        assert stored.output[0].model_dump() == answered.output[0].model_dump()  # summary, sealed text: the same
        assert stored.usage.output_tokens == answered.usage.output_tokens
        assert answered.status == "completed" or answered.usage.output_tokens == 16  # incomplete: out of tokens
        assert [item.type for item in answered.output] == ["reasoning", "message"]
        with stack.client() as client:
            job = client.get(f"/v1/jobs/{uuid.UUID(hex=answered.id.removeprefix('resp_'))}").json()
        assert job["status"] == "succeeded" and job["content"] == answered.output_text
        assert job["usage"]["completion_tokens"] == answered.usage.output_tokens
    r0 = Response.model_validate(output["r0"]["response"]["body"]).output[0]
    assert r0.summary and r0.encrypted_content  # as the line asked
    # The route answers the same request with the same text (greedy sampling).
    direct = sdk.responses.create(**lines[1]["body"])
    assert direct.output_text == Response.model_validate(output["r1"]["response"]["body"]).output_text


@pytest.mark.parametrize(
    ("text", "code", "line"),
    [
        ("this is not JSON\n", "invalid_json_line", 1),
        (
            json.dumps(request_line("a")) + "\n" + json.dumps(request_line("b") | {"url": "/v1/embeddings"}),
            "invalid_url",
            2,
        ),
        ("\n".join(json.dumps(request_line(c)) for c in ("a", "b", "a")), "duplicate_custom_id", 3),
    ],
)
def test_an_invalid_file_fails_the_batch_with_its_errors(sdk, text, code, line):
    failed = wait_batch(sdk, run_batch(sdk, text).id)
    assert failed.status == "failed" and failed.failed_at and failed.output_file_id is None
    assert [(e.code, e.line) for e in failed.errors.data] == [(code, line)]
    assert failed.request_counts.total == 0  # no job was made


def test_a_cancelled_batch_keeps_what_was_done(stack, sdk):
    # Two short lines finish at once; the long ones are still running or queued when the cancel comes.
    lines = [request_line("short-0", max_tokens=1), request_line("short-1", max_tokens=1)]
    lines += [request_line(f"long-{i}", "Tell me a very long story.", max_tokens=1500) for i in range(12)]
    batch = run_batch(sdk, lines)
    deadline = time.monotonic() + WAIT
    while sdk.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert sdk.batches.cancel(batch.id).status == "cancelling"  # again: the same
    cancelled = wait_batch(sdk, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    counts = cancelled.request_counts
    assert counts.total == 14 and counts.completed >= 2 and counts.completed + counts.failed == 14
    output, errors = file_lines(sdk, cancelled.output_file_id), file_lines(sdk, cancelled.error_file_id)
    assert {"short-0", "short-1"} <= {line["custom_id"] for line in output} and len(output) == counts.completed
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(batch.id)
    with stack.client() as client:
        job_id = errors[0]["id"].removeprefix("batch_req_")
        assert client.get(f"/v1/jobs/{uuid.UUID(job_id)}").json()["status"] == "cancelled"


def test_a_batch_past_its_window_expires_and_keeps_what_was_done(stack, sdk):
    lines = [request_line("short", max_tokens=1)]
    lines += [request_line(f"long-{i}", "Tell me a very long story.", max_tokens=1500) for i in range(12)]
    batch = run_batch(sdk, lines)
    deadline = time.monotonic() + WAIT
    while sdk.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # 24 hours later: the window is the batch's jobs' deadline, which maintenance enforces
    past = datetime.now(UTC) - timedelta(seconds=1)
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        session.exec(update(Job).where(col(Job.batch_id) == batch.id).values(expires_at=past))
        session.exec(update(Batch).where(col(Batch.id) == batch.id).values(expires_at=past))
        session.commit()
    expired = wait_batch(sdk, batch.id)
    assert expired.status == "expired" and expired.expired_at and expired.completed_at is None
    assert (expired.request_counts.total, expired.request_counts.completed) == (13, 1)
    assert [line["custom_id"] for line in file_lines(sdk, expired.output_file_id)] == ["short"]
    errors = file_lines(sdk, expired.error_file_id)
    assert len(errors) == 12 and {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_direct_jobs_go_before_a_batchs(stack, sdk):
    """A direct job submitted after a 50-line batch starts before the batch's last lines: batch jobs
    are queued at a lower priority, so a worker takes every direct job first."""
    batch = run_batch(sdk, [request_line(f"l{i}", f"Line {i}: tell a story.", max_tokens=48) for i in range(50)])
    wait_batch(sdk, batch.id, until=("in_progress", "completed", "failed"))  # all 50 queued by now
    with stack.client() as client:
        direct = client.post("/v1/jobs", json={"prompt": "Direct.", "max_tokens": 4}).json()
        direct = wait_final(client, direct["id"])
        done = wait_batch(sdk, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 50
        jobs = [
            client.get(f"/v1/jobs/{line['response']['body']['id'].removeprefix('chatcmpl-')}").json()
            for line in file_lines(sdk, done.output_file_id)
        ]
    started_after = [j for j in jobs if j["timings"]["started_at"] > direct["timings"]["started_at"]]
    # In one FIFO queue all 50 would have started first.
    assert len(started_after) >= 5, f"only {len(started_after)} of 50 batch jobs started after the direct one"


def test_another_key_sees_neither_the_files_nor_the_batches(sdk, other_sdk):
    file_id = upload(sdk, [request_line("a")])
    batch = sdk.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h")
    for call in (
        lambda: other_sdk.files.retrieve(file_id),
        lambda: other_sdk.files.content(file_id),
        lambda: other_sdk.files.delete(file_id),
        lambda: other_sdk.batches.retrieve(batch.id),
        lambda: other_sdk.batches.cancel(batch.id),
        lambda: other_sdk.batches.create(input_file_id=file_id, endpoint=URL, completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file_id not in {f.id for f in other_sdk.files.list()}
    assert batch.id not in {b.id for b in other_sdk.batches.list()}
    assert wait_batch(sdk, batch.id).status == "completed"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"completion_window": "48h"}, "completion_window"),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ],
)
def test_bad_batch_parameters_are_400s(sdk, fields, param):
    request = {"input_file_id": upload(sdk, [request_line("a")]), "endpoint": URL, "completion_window": "24h"}
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.batches.create(**(request | fields))
    assert raised.value.param == param


def test_bad_uploads_are_400s(sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert raised.value.param == "purpose"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint=URL, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("file-nope")
