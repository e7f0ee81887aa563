"""A batch line onto a job, without the stack: the chat and responses routes' mappings (a refused
body is the error its route would answer, 422s as 400s), and the output and error lines a finished
job makes."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from ponder.service.batch_input import BatchLine
from ponder.service.openai.batches import error_line, line_job, output_line
from ponder.service.settings import Settings
from ponder.service.tables import Batch, BatchLineError, Job, JobStatus, utcnow

SETTINGS = Settings(model="tiny-llama", _env_file=None)
URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"


def a_batch(endpoint: str) -> Batch:
    return Batch(
        id="batch_x",
        api_key_id=uuid.UUID(int=7),
        endpoint=endpoint,
        input_file_id="file-x",
        completion_window="24h",
        expires_at=utcnow() + timedelta(hours=24),
    )


BATCH, RESPONSES_BATCH = a_batch(URL), a_batch(RESPONSES_URL)


def body(**fields) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]} | fields


def test_a_line_is_the_job_its_chat_request_would_be():
    columns = line_job(
        BatchLine(7, "req-7", body(max_completion_tokens=10, reasoning_effort="medium")), BATCH, SETTINGS
    )
    assert isinstance(columns, dict)
    job = Job(**columns)
    assert (job.batch_id, job.batch_line, job.batch_custom_id) == ("batch_x", 7, "req-7")
    assert job.api_key_id == BATCH.api_key_id and job.expires_at == BATCH.expires_at  # the window is its deadline
    assert (job.request["max_tokens"], job.request["max_reasoning_tokens"]) == (10, 5)
    assert job.status == JobStatus.queued and job.prompt_tokens == len(job.prompt_token_ids) > 0


def test_a_line_is_the_job_its_responses_request_would_be():
    line = {
        "model": "tiny-llama",
        "input": "hi",
        "instructions": "Be brief.",
        "max_output_tokens": 10,
        "reasoning": {"effort": "high", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
    }
    columns = line_job(BatchLine(3, "resp-3", line), RESPONSES_BATCH, SETTINGS)
    assert isinstance(columns, dict)
    job = Job(**columns)
    assert (job.batch_id, job.batch_line, job.batch_custom_id) == ("batch_x", 3, "resp-3")
    assert job.request["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (job.request["max_tokens"], job.request["max_reasoning_tokens"]) == (10, 8)
    # a response: GET /v1/responses/{id} finds it, and its object shows what was asked
    assert job.openai_response is not None and job.openai_response["reasoning"]["effort"] == "high"
    assert job.openai_response["reasoning"]["summary"] == "auto"
    assert job.openai_response["include"] == ["reasoning.encrypted_content"]
    assert job.openai_response["background"] is False and job.expires_at == RESPONSES_BATCH.expires_at


def refusal(fields: dict, batch: Batch = BATCH) -> BatchLineError:
    refused = line_job(BatchLine(2, "r", fields), batch, SETTINGS)
    assert isinstance(refused, BatchLineError)
    assert (refused.batch_id, refused.line, refused.custom_id) == ("batch_x", 2, "r")
    return refused


def test_a_refused_body_is_the_error_its_route_would_answer():
    bad = refusal(body(temperature=5))
    assert bad.status_code == 400 and bad.body["error"]["param"] == "temperature"
    assert bad.body["error"]["type"] == "invalid_request_error"
    unknown = refusal(body(frobnicate=1))
    assert unknown.status_code == 400 and unknown.body["error"]["message"] == "unknown field 'frobnicate'"
    model = refusal(body(model="gpt-4o"))
    assert model.status_code == 404 and model.body["error"]["code"] == "model_not_found"
    renamed = refusal(body(max_completion_tokens=10**9))  # prepare_prompt's 422, in the request's terms, as a 400
    assert renamed.status_code == 400 and renamed.body["error"]["param"] == "max_completion_tokens"
    assert refusal(body(stream=True)).body["error"]["param"] == "stream"


def test_a_refused_responses_body_is_named_in_its_own_terms():
    line = {"model": "tiny-llama", "input": "hi"}
    too_long = refusal(line | {"max_output_tokens": 10**9}, RESPONSES_BATCH)
    assert too_long.status_code == 400 and too_long.body["error"]["param"] == "max_output_tokens"
    assert refusal(line | {"stream": True}, RESPONSES_BATCH).body["error"]["param"] == "stream"
    assert refusal(line | {"model": "gpt-4o"}, RESPONSES_BATCH).status_code == 404
    chat_body = refusal(body(), RESPONSES_BATCH)  # a chat request sent to /v1/responses
    assert chat_body.status_code == 400 and chat_body.body["error"]["param"] == "input"


def finished(status: JobStatus, **fields) -> Job:
    job = Job(
        api_key_id=BATCH.api_key_id,
        model="tiny-llama",
        request={"max_tokens": 4},
        prompt_token_ids=[1, 2],
        prompt_tokens=2,
        expires_at=BATCH.expires_at,
        batch_id=BATCH.id,
        batch_line=3,
        batch_custom_id="c3",
        status=status,
        **fields,
    )
    return job


def test_result_lines():
    done = finished(JobStatus.succeeded, content="hello", reasoning_content="hmm", completion_tokens=4)
    out = json.loads(output_line(done, URL, SETTINGS))
    assert out["id"] == f"batch_req_{done.id.hex}" and out["custom_id"] == "c3" and out["error"] is None
    response = out["response"]
    assert response["status_code"] == 200 and response["request_id"] == f"req_{done.id.hex}"
    assert response["body"]["object"] == "chat.completion" and response["body"]["id"] == f"chatcmpl-{done.id}"
    assert response["body"]["choices"][0]["message"]["content"] == "hello"
    assert response["body"]["usage"]["total_tokens"] == 6
    as_response = finished(JobStatus.succeeded, content="hello", completion_tokens=4, finish_reason="stop")
    as_response.openai_response = {"background": False, "reasoning": None}
    body_ = json.loads(output_line(as_response, RESPONSES_URL, SETTINGS))["response"]["body"]
    assert (body_["object"], body_["id"], body_["status"]) == ("response", f"resp_{as_response.id.hex}", "completed")
    assert body_["output"][-1]["content"][0]["text"] == "hello" and body_["usage"]["output_tokens"] == 4

    failed = json.loads(error_line(finished(JobStatus.failed, error="boom")))
    assert failed["error"] is None and failed["response"]["status_code"] == 500
    assert (
        failed["response"]["body"]["error"]["code"] == "job_failed"
        and "boom" in failed["response"]["body"]["error"]["message"]
    )
    for status, code in ((JobStatus.cancelled, "batch_cancelled"), (JobStatus.expired, "batch_expired")):
        line = json.loads(error_line(finished(status)))
        assert line["response"] is None and line["error"]["code"] == code and line["custom_id"] == "c3"

    refused = BatchLineError(batch_id=BATCH.id, line=2, custom_id="r", status_code=400, body={"error": {"m": 1}})
    line = json.loads(error_line(refused))
    assert line["response"] == {
        "status_code": 400,
        "request_id": line["response"]["request_id"],
        "body": {"error": {"m": 1}},
    }
    assert line["id"] == json.loads(error_line(refused))["id"]  # the same id every time it is written
