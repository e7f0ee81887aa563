"""Structured outputs through the official `openai` SDK and the jobs API, against the real stack:
`chat.completions.parse` and `responses.parse` give back the Pydantic object, the jobs API's
`parsed`, vLLM's `structured_outputs` choice, and a budget that ends mid-object is `length`.

tiny-llama has random weights: only the grammar makes its answer valid. Its chat template opens a
thinking block, so a thinking budget (reasoning_effort, max_reasoning_tokens) forces `</think>`,
after which the answer is constrained; the reasoning before it is free text (it is not the JSON)."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.stack import SQLITE_ONLY, wait_final

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MODEL = "tiny-llama"
QUESTION = [{"role": "user", "content": "Is the sky blue? Answer as JSON."}]


class Verdict(BaseModel):
    label: Literal["yes", "no"]
    score: int = Field(ge=0, le=9)


def _assert_free_reasoning(reasoning: str | None) -> None:
    """The thinking was written before the constraint started: random text, not the answer."""
    assert reasoning, "a thinking budget leaves reasoning before the answer"
    with pytest.raises(ValueError):
        Verdict.model_validate_json(reasoning)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_completions_parse_gives_back_the_model(sdk, seed):
    completion = sdk.chat.completions.parse(
        model=MODEL,
        messages=QUESTION,
        response_format=Verdict,
        max_completion_tokens=64,
        reasoning_effort="low",  # 12 tokens of thinking, then </think> and the answer
        temperature=1.0,
        seed=seed,
    )
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Verdict)
    assert choice.message.parsed == Verdict.model_validate_json(choice.message.content)
    _assert_free_reasoning(choice.message.reasoning_content)


def test_responses_parse_gives_back_the_model(sdk):
    response = sdk.responses.parse(
        model=MODEL,
        input="Is the sky blue? Answer as JSON.",
        text_format=Verdict,
        reasoning={"effort": "low"},
        max_output_tokens=64,
        temperature=1.0,
        extra_body={"seed": 5},
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Verdict)
    assert response.text.format.type == "json_schema" and response.text.format.name == "Verdict"
    reasoning = [item for item in response.output if item.type == "reasoning"]
    _assert_free_reasoning(reasoning[0].content[0].text)


def test_a_job_with_a_schema_has_its_answer_parsed(stack):
    schema = Verdict.model_json_schema() | {"additionalProperties": False}  # else any other keys may follow
    body = {
        "messages": QUESTION,
        "max_tokens": 64,
        "max_reasoning_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    }
    with stack.client() as client:
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_final(client, created.json()["id"])
    assert job["status"] == "succeeded" and job["finish_reason"] == "stop", job["content"]
    assert job["parsed"] == json.loads(job["content"]) and Verdict.model_validate(job["parsed"])
    assert [sample["parsed"] for sample in job["samples"]] == [json.loads(s["content"]) for s in job["samples"]]
    _assert_free_reasoning(job["reasoning_content"])


def test_vllms_choice_in_extra_body(sdk):
    choices = ["red", "green", "blue"]
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a colour."}],
        max_completion_tokens=32,
        extra_body={"max_reasoning_tokens": 4, "structured_outputs": {"choice": choices}},
        temperature=1.0,
        n=4,
        seed=7,
    )
    assert [c.finish_reason for c in completion.choices] == ["stop"] * 4
    assert {c.message.content.strip() for c in completion.choices} <= set(choices)


def test_a_budget_that_ends_mid_object_is_length(sdk, stack):
    class Essay(BaseModel):
        text: str = Field(min_length=200)  # more than the budget leaves

    with pytest.raises(openai.LengthFinishReasonError) as raised:
        sdk.chat.completions.parse(
            model=MODEL,
            messages=QUESTION,
            response_format=Essay,
            max_completion_tokens=24,
            extra_body={"max_reasoning_tokens": 2},
        )
    completion = raised.value.completion
    (choice,) = completion.choices
    assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith('{"text":')
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{completion.id.removeprefix('chatcmpl-')}").json()
    assert job["finish_reason"] == "length" and job["parsed"] is None


def test_self_consistency_over_a_json_field(stack):
    """n samples held to a schema, voted on by one field's value (`vote.field`), not `\\boxed{}`."""
    schema = {
        "type": "object",
        "properties": {"verdict": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 6}},
        "required": ["verdict", "why"],
        "additionalProperties": False,
    }
    body = {
        "messages": QUESTION,
        "max_tokens": 64,
        "max_reasoning_tokens": 6,
        "temperature": 1.0,
        "seed": 21,
        "n": 6,
        "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        "vote": {"field": "verdict"},
    }
    with stack.client() as client:
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_final(client, created.json()["id"])
        refused = client.post("/v1/jobs", json={**body, "response_format": None})
    verdicts = [json.loads(s["content"])["verdict"] for s in job["samples"] if s["finish_reason"] == "stop"]
    vote = job["vote"]
    assert sum(group["count"] for group in vote["groups"]) == len(verdicts) >= 4
    assert {json.loads(group["answer"]) for group in vote["groups"]} == set(verdicts)
    assert vote["groups"][0]["count"] == max(verdicts.count(v) for v in verdicts)
    assert job["answer"] == vote["answer"] == vote["groups"][0]["answer"]
    assert refused.status_code == 422 and "vote.field needs a JSON answer" in refused.text
