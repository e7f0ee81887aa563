"""The OpenAI-compatible routes through the official `openai` SDK against the real stack:
/v1/models, /v1/chat/completions (waiting and streaming), the job each completion becomes, its
errors as the SDK raises them, and the job cancelled when the client goes away.

tiny-llama's chat template opens a thinking block (as R1's does), so everything it writes is
reasoning until `</think>`; a reasoning_effort budget forces that tag, so a completion has both
reasoning_content and content."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from sqlmodel import Session

from ponder.engine.model_store import resolve_model
from ponder.engine.reasoning import THINK_END_FORCED
from ponder.engine.tokenizer import Tokenizer
from ponder.service.db import database_engine
from ponder.service.openai.common import REASONING_EFFORT_SHARES
from ponder.service.tables import Job
from tests.stack import SQLITE_ONLY, wait_final

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MODEL = "tiny-llama"
QUESTION = [{"role": "user", "content": "Why is the sky blue? Think it through."}]


def job_id_of(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-"), completion_id
    return completion_id.removeprefix("chatcmpl-")


def test_models_list_and_retrieve(sdk):
    models = sdk.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "ponder")]
    assert models.data[0].created > 0
    assert sdk.models.retrieve(MODEL).model_dump() == models.data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found" and raised.value.request_id


def test_a_chat_completion_is_a_job_and_its_stream_says_the_same(stack, sdk):
    request = {
        "model": MODEL,
        "messages": QUESTION,
        "max_completion_tokens": 24,
        "temperature": 0,
        "reasoning_effort": "low",  # a budget of 24 * 20% = 4 tokens, then </think> and the answer
    }
    completion = sdk.chat.completions.create(**request)
    assert completion.object == "chat.completion" and completion.model == MODEL and completion._request_id
    assert abs(completion.created - time.time()) < 600
    (choice,) = completion.choices
    message, usage = choice.message, completion.usage
    assert message.role == "assistant" and choice.index == 0 and choice.finish_reason == "length"
    assert message.content and message.reasoning_content and message.reasoning == message.reasoning_content
    assert usage.completion_tokens == 24 and usage.total_tokens == usage.prompt_tokens + 24
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens

    chunks = list(sdk.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning_content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    streamed = chunks[-1].usage.model_dump()
    # The same prompt again: its blocks are in the prefix cache now, so only cached_tokens may differ.
    assert 0 < streamed["prompt_tokens_details"].pop("cached_tokens") <= usage.prompt_tokens
    expected = usage.model_dump()
    assert expected["prompt_tokens_details"].pop("cached_tokens") <= usage.prompt_tokens
    assert streamed == expected

    with stack.client() as client:
        for made, said in ((completion.id, usage), (chunks[0].id, chunks[-1].usage)):
            job = client.get(f"/v1/jobs/{job_id_of(made)}").json()
            assert job["status"] == "succeeded" and job["finish_reason"] == "length"
            assert (job["content"], job["reasoning_content"]) == (message.content, message.reasoning_content)
            assert job["usage"]["prompt_tokens"] == said.prompt_tokens
            assert job["usage"]["completion_tokens"] == said.completion_tokens
            assert job["usage"]["reasoning_tokens"] == said.completion_tokens_details.reasoning_tokens
            assert job["usage"]["cached_tokens"] == said.prompt_tokens_details.cached_tokens
            assert job["progress"]["max_tokens"] == 24
        listed = [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]]
        assert {job_id_of(completion.id), job_id_of(chunks[0].id)} <= set(listed)
        finished_day = client.get(f"/v1/jobs/{job_id_of(completion.id)}").json()["timings"]["finished_at"][:10]
        report = client.get("/v1/usage").json()["data"]
        (row,) = [r for r in report if r["day"] == finished_day and r["model"] == MODEL]
        assert row["jobs"] >= 2 and row["completion_tokens"] >= 48
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        stored = session.get(Job, uuid.UUID(job_id_of(completion.id))).request
    assert (stored["max_tokens"], stored["max_reasoning_tokens"], stored["temperature"]) == (24, 4, 0)


def test_n_choices_are_the_samples_of_one_job(stack, sdk):
    """n choices from one job (the prompt prefilled once, then forked): each choice a sample of its
    own, usage summed over them, the stream's choices the same texts as the waiting request's."""
    request = {"model": MODEL, "messages": QUESTION, "max_completion_tokens": 16, "temperature": 1.0, "seed": 3}
    completion = sdk.chat.completions.create(**request, n=3)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [(c.message.reasoning_content, c.message.content) for c in completion.choices]
    assert len(set(texts)) == 3  # three random streams of one seed
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(completion.id)}").json()
    assert completion.usage.completion_tokens == sum(s["completion_tokens"] for s in job["samples"])
    assert completion.usage.prompt_tokens == job["usage"]["prompt_tokens"]

    streamed = {i: ["", ""] for i in range(3)}
    for chunk in sdk.chat.completions.create(**request, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index][0] += getattr(choice.delta, "reasoning_content", None) or ""
            streamed[choice.index][1] += choice.delta.content or ""
    assert [(r or None, c) for r, c in streamed.values()] == [(r or None, c) for r, c in texts]


def test_openai_fields_that_change_nothing_are_accepted(stack, sdk):
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=3,  # the older name
        seed=7,
        stop=["\n\n\n"],
        user="alice",
        metadata={"case": "harmless"},
        n=1,
        frequency_penalty=0,
        presence_penalty=0,
        store=False,
        parallel_tool_calls=True,
        service_tier="auto",
        logit_bias={},
        logprobs=False,
        modalities=["text"],
        response_format={"type": "text"},
        extra_body={"top_k": 20},  # Ponder's own sampling fields ride along as in POST /v1/jobs
    )
    completion, job_id = raw.parse(), raw.headers["x-ponder-job-id"]
    assert job_id_of(completion.id) == job_id and completion.usage.completion_tokens == 3
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["metadata"] == {"case": "harmless", "user": "alice"}


def test_penalties_logit_bias_and_min_tokens_reach_the_engine(sdk):
    # tiny-llama's byte tokens: id 97 is "a". Biased to +100 it is every greedy token, and reasoning
    # (the template opens thinking) is all "a"; min_tokens holds EOS back (it is "a" anyway here).
    request = {"model": MODEL, "messages": QUESTION, "max_completion_tokens": 12, "temperature": 0}
    biased = sdk.chat.completions.create(**request, logit_bias={"97": 100}, extra_body={"min_tokens": 6})
    assert biased.choices[0].message.reasoning_content == "a" * 12
    # Greedy tiny-llama repeats itself: the penalties change what it writes (tests/e2e/test_jobs.py
    # checks the tokens against the engine's own).
    plain = sdk.chat.completions.create(**request)
    penalised = sdk.chat.completions.create(
        **request, frequency_penalty=2, presence_penalty=2, extra_body={"repetition_penalty": 1.3, "min_p": 0.05}
    )
    assert penalised.choices[0].message.reasoning_content != plain.choices[0].message.reasoning_content


def test_logprobs_waited_streamed_and_on_the_job_are_the_same_values(stack, sdk):
    """logprobs with top_logprobs: every output token (the thinking's too, as vLLM gives them) with
    its value, bytes and alternatives; the stream's chunks carry the same values, and so does the job."""
    request = {"model": MODEL, "messages": QUESTION, "max_completion_tokens": 16, "temperature": 0}
    request |= {"reasoning_effort": "low", "logprobs": True, "top_logprobs": 5}
    completion = sdk.chat.completions.create(**request)
    (choice,) = completion.choices
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 16
    for entry in entries:
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs == sorted(entry.top_logprobs, key=lambda top: -top.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="backslashreplace") == entry.token
    # Greedy: each token the model chose is its top one; the budget's forced end of thinking is not.
    budget = int(16 * REASONING_EFFORT_SHARES["low"])
    forced = len(Tokenizer.from_pretrained(resolve_model(MODEL)).encode(THINK_END_FORCED, add_special_tokens=False))
    chosen = entries[:budget] + entries[budget + forced :]
    assert all(e.logprob == e.top_logprobs[0].logprob and e.token == e.top_logprobs[0].token for e in chosen)
    assert b"".join(bytes(e.bytes) for e in entries[budget : budget + forced]) == THINK_END_FORCED.encode()

    chunks = list(sdk.chat.completions.create(**request, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id_of(completion.id)}").json()
    assert job["logprobs"] == choice.logprobs.model_dump()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 5}, "temperature"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
            "tools.0.function.parameters",
        ),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),  # more samples than the stack's engines run at once
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logit_bias": {"97": 150}}, "logit_bias.97"),
        ({"logit_bias": {"999": 1}}, "logit_bias"),  # outside tiny-llama's vocabulary (320)
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"extra_body": {"min_tokens": 5}}, "min_tokens"),  # more than max_completion_tokens
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
            "response_format",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "(["}}}, "structured_outputs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"surprise": True}}, "surprise"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_parameters_are_400s_naming_the_parameter(sdk, fields, param):
    request = {"model": MODEL, "messages": QUESTION, "max_completion_tokens": 4} | fields
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(**request)
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error" and error.message
    assert error.param == (param or "messages.0.content"), error.body


def test_auth_and_model_errors_are_the_sdks_own(stack, sdk):
    with OpenAI(base_url=f"{stack.base_url}/v1", api_key="pdr_not-a-real-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION, max_completion_tokens=1)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


LONG = 2000  # tokens: as many as tiny-llama's context (2048) leaves; a few seconds on a fast machine


def long_request(marker: str) -> dict:
    # Greedy on tiny-llama never writes EOS: this runs all LONG tokens unless it is stopped.
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on"}],
        "max_completion_tokens": LONG,
        "temperature": 0,
        "metadata": {"marker": marker},
    }


def test_a_client_that_leaves_mid_stream_has_its_job_cancelled(stack, sdk):
    stream = sdk.chat.completions.create(**long_request("stream"), stream=True)
    for chunk in stream:
        if chunk.choices and getattr(chunk.choices[0].delta, "reasoning_content", None):
            break  # the job is running and writing
    stream.close()
    with stack.client() as client:
        job = wait_final(client, job_id_of(chunk.id))
    assert job["status"] == "cancelled" and job["finish_reason"] == "abort"
    assert 0 < job["usage"]["completion_tokens"] < LONG


def test_a_client_that_leaves_while_waiting_has_its_job_cancelled(stack):
    marker = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=httpx.Timeout(60, read=1)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=long_request(marker))
    with stack.client() as client:
        listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
        (job,) = [j for j in listed if j["metadata"] == {"marker": marker}]
        job = wait_final(client, job["id"])
    assert job["status"] == "cancelled" and job["usage"]["completion_tokens"] < LONG


def test_every_response_has_a_request_id(stack):
    with stack.client() as client:
        for response in (
            client.get("/healthz"),
            client.get("/v1/nothing-here"),
            client.get("/v1/models"),
            client.post("/v1/jobs", json={"prompt": "x" * (2 << 20)}),  # 413, from outside the routes
            client.post("/v1/chat/completions", json={"model": MODEL}),
        ):
            assert response.headers["x-request-id"].startswith("req_"), response
        mine = client.get("/v1/models", headers={"x-request-id": "proxy-123"})
        assert mine.headers["x-request-id"] == "proxy-123"
        assert client.get("/healthz", headers={"x-request-id": "bad id\t!"}).headers["x-request-id"].startswith("req_")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
chat_like = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, MODEL, "gpt-4o"])},
    optional={
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "developer", "tool"]), "content": json_values | st.text()}
                ),
                max_size=3,
            ),
        ),
        "temperature": json_values,
        "top_p": json_values,
        "seed": st.one_of(st.integers(-(2**70), 2**70), json_values),
        "stop": json_values,
        "reasoning_effort": st.sampled_from(["low", "high", "extreme"]) | json_values,
        "metadata": json_values,
        "n": json_values,
        "tools": json_values,
        "logit_bias": json_values,
        "stream_options": json_values,
        "user": json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_like)
def test_random_chat_requests_are_answered_or_refused_with_a_400(stack, body):
    body = body | {"max_completion_tokens": 1}  # valid by chance: done in one token
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"type", "message", "param", "code"}
