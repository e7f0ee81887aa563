"""What shape an answer must have, as each surface takes it (ponder/service/response_format.py):
OpenAI's chat `response_format`, the Responses API's `text.format`, vLLM's `structured_outputs`
and the jobs API's fields of the same names all become one engine Constraint; one that cannot be
compiled is the request's 400 (422 on /v1/jobs), before anything is queued."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from ponder.engine.constraint import Constraint, ConstraintKind
from ponder.service.batch_input import BatchLine
from ponder.service.errors import ServiceError, status_code_of
from ponder.service.job_public import JobPublic
from ponder.service.openai.batches import line_job
from ponder.service.openai.chat import job_request as chat_job_request
from ponder.service.openai.chat_schemas import ChatCompletionCreate
from ponder.service.openai.response_schemas import ResponseCreate
from ponder.service.openai.responses import job_request as response_job_request
from ponder.service.openai.responses import shown_request
from ponder.service.response_format import MAX_SPEC_CHARS
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.tables import BatchLineError, Job
from tests.service.test_openai_batches import RESPONSES_URL, a_batch
from tests.service.test_openai_batches import URL as CHAT_URL

SETTINGS = Settings(model="tiny-llama", _env_file=None)
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["label", "score"],
    "additionalProperties": False,
}
CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def chat(**fields) -> JobCreate:
    return chat_job_request(
        ChatCompletionCreate(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], **fields), SETTINGS
    )


def response(**fields) -> JobCreate:
    return response_job_request(ResponseCreate(model="tiny-llama", input="hi", **fields), SETTINGS)


def constraint_of(request: JobCreate) -> Constraint | None:
    return request.sampling_params(8).constraint


def stored(request: JobCreate) -> JobCreate:
    """The request as its worker reads it back from the job's row."""
    return JobCreate.from_stored(json.loads(json.dumps(request.model_dump(mode="json", exclude_none=True))))


def test_every_surface_asks_for_the_same_constraint():
    expected = Constraint(ConstraintKind.json_schema, json.dumps(SCHEMA))
    flat = {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}
    requests = [
        chat(response_format=CHAT_FORMAT),
        response(text={"format": flat}),
        chat(structured_outputs={"json": SCHEMA}),
        JobCreate(prompt="hi", response_format=CHAT_FORMAT),
    ]
    for request in requests:
        assert constraint_of(request) == expected
        assert constraint_of(stored(request)) == expected  # the worker's copy asks the same
    json_object = Constraint(ConstraintKind.json_object)
    assert constraint_of(chat(response_format={"type": "json_object"})) == json_object
    assert constraint_of(response(text={"format": {"type": "json_object"}})) == json_object
    assert constraint_of(chat(response_format={"type": "text"})) is None
    assert constraint_of(response(text={"format": {"type": "text"}})) is None
    assert constraint_of(chat()) is None


def test_vllms_regex_choice_and_grammar():
    assert constraint_of(chat(structured_outputs={"regex": "[0-9]{3}"})) == Constraint(ConstraintKind.regex, "[0-9]{3}")
    choice = constraint_of(stored(chat(structured_outputs={"choice": ["yes", "no"]})))
    assert choice == Constraint(ConstraintKind.choice, choices=("yes", "no"))
    grammar = 'start: "a" | "b"'
    assert constraint_of(response(structured_outputs={"grammar": grammar})) == Constraint(
        ConstraintKind.grammar, grammar
    )


def test_the_responses_text_format_is_echoed_in_its_response_object():
    flat = {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}
    body = ResponseCreate(model="tiny-llama", input="hi", text={"format": flat})
    assert shown_request(body)["text"] == {"format": flat}


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
            "cannot be compiled",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format", "json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.name",
            "pattern",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "text"),
        ({"structured_outputs": {"regex": "(["}}, "structured_outputs", "cannot be compiled"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs", "cannot be compiled"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
        ({"structured_outputs": {"json": {"enum": ["x" * MAX_SPEC_CHARS]}}}, "structured_outputs", "at most"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, None, "not both"),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_a_400_naming_its_parameter(fields, param, says):
    with pytest.raises((ServiceError, ValidationError)) as raised:
        chat(**fields)
    error = raised.value
    if isinstance(error, ValidationError):  # refused by the request's own model (the route answers 400)
        (detail,) = error.errors()
        where, message = ".".join(map(str, detail["loc"])), detail["msg"]
    else:
        assert status_code_of(error) == 400
        where, message = error.param, error.message
    assert (where or None) == param or (param and where.startswith(param)), (where, message)
    assert says in message, message


def test_the_jobs_api_refuses_the_same_as_a_validation_error():
    with pytest.raises(ValidationError) as raised:
        JobCreate(prompt="hi", structured_outputs={"regex": "(["})
    assert raised.value.errors()[0]["loc"] == ("structured_outputs",)


def test_parsed_is_the_finished_json_answer_only():
    request = JobCreate(prompt="hi", response_format={"type": "json_object"}).model_dump(mode="json", exclude_none=True)
    job = Job(api_key_id=uuid.uuid4(), model="m", request=request | {"max_tokens": 8}, expires_at=datetime.now(UTC))
    job.content, job.finish_reason = '{"a": [1, 2]}', "stop"
    assert JobPublic.model_validate(job).parsed == {"a": [1, 2]}
    job.content, job.finish_reason = '{"a": [1, 2', "length"  # the budget ended mid-object
    assert JobPublic.model_validate(job).parsed is None
    job.request = {"prompt": "hi", "max_tokens": 8}  # no JSON asked for: nothing parsed, even if it parses
    job.content, job.finish_reason = '{"a": 1}', "stop"
    assert JobPublic.model_validate(job).parsed is None


def test_batch_lines_of_both_endpoints_take_a_format_and_refuse_a_bad_one():
    chat_body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "response_format": CHAT_FORMAT}
    flat = {"type": "json_schema", "name": "verdict", "schema": SCHEMA}
    responses_body = {"model": "tiny-llama", "input": "hi", "text": {"format": flat}}
    expected = Constraint(ConstraintKind.json_schema, json.dumps(SCHEMA))
    for endpoint, body in [(CHAT_URL, chat_body), (RESPONSES_URL, responses_body)]:
        columns = line_job(BatchLine(1, "a", body), a_batch(endpoint), SETTINGS)
        assert isinstance(columns, dict), columns
        assert constraint_of(JobCreate.from_stored(Job(**columns).request)) == expected
    bad = chat_body | {"structured_outputs": {"regex": "(["}, "response_format": None}
    refused = line_job(BatchLine(2, "b", bad), a_batch(CHAT_URL), SETTINGS)
    assert isinstance(refused, BatchLineError) and refused.status_code == 400
    assert refused.body["error"]["param"] == "structured_outputs", refused.body
