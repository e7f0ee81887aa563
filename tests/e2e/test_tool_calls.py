"""Tool calls through the official `openai` SDK against the real stack: a round trip (the model
calls, the tool's result goes back, the model answers) with `tool_choice="required"` and with
`"auto"`; streamed `delta.tool_calls` reassembled by the SDK's own stream helper into the same
call; bad tools as 400s naming the parameter.

tiny-llama has random weights and a template that renders no tools: they reach it in a system
message with the Hermes syntax (ponder/service/function_tools.py); `required` holds its answer to
calls with valid arguments, so the calls parse whatever the weights."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.engine.test_tool_calls import ADD  # two integers in [0, 99]
from tests.stack import SQLITE_ONLY

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MODEL = "tiny-llama"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Use the tool."}]
BUDGET = {"max_completion_tokens": 200, "temperature": 1.0, "extra_body": {"max_reasoning_tokens": 4}}


def test_a_round_trip_with_required_then_auto(sdk):
    first = sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[ADD], tool_choice="required", seed=1, **BUDGET
    )
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls[:1]
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD["function"]["parameters"])
    result = {"role": "tool", "tool_call_id": call.id, "content": str(arguments["a"] + arguments["b"])}
    conversation = [*QUESTION, choice.message.model_dump(exclude_none=True), result]
    second = sdk.chat.completions.create(
        model=MODEL, messages=conversation, tools=[ADD], tool_choice="auto", seed=1, **BUDGET
    )
    (answer,) = second.choices
    assert answer.finish_reason in ("stop", "length") and answer.message.reasoning_content
    assert answer.message.tool_calls is None or all(c.function.name == "add" for c in answer.message.tool_calls)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_a_named_function_and_one_call(sdk):
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        seed=2,
        n=3,
        **BUDGET,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["add"]
    assert len({c.message.tool_calls[0].id for c in completion.choices}) == 3  # one id per call


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(sdk):
    request = {"model": MODEL, "messages": QUESTION, "tools": [ADD], "tool_choice": "required", "seed": 3, **BUDGET}
    whole = sdk.chat.completions.create(**request)
    with sdk.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion()

    def calls(completion) -> list[tuple[str, str, str]]:
        return [(c.type, c.function.name, c.function.arguments) for c in completion.choices[0].message.tool_calls]

    assert calls(streamed) == calls(whole) and calls(whole)  # the same seed: the same call (ids are per job)
    assert all(c.id.startswith("call_") for c in streamed.choices[0].message.tool_calls)
    assert streamed.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, None),
        ({"tool_choice": "required"}, None),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools"),
        ({"tools": [ADD], "response_format": {"type": "json_object"}}, None),
    ],
)
def test_bad_tools_are_400s(sdk, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=8, **fields)
    assert raised.value.status_code == 400
    assert param is None or (raised.value.param or "").startswith(param), raised.value.body


RESPONSES_ADD = {"type": "function", **ADD["function"]}


def test_a_responses_round_trip_function_call_then_its_output(sdk):
    request = {"model": MODEL, "tools": [RESPONSES_ADD], "max_output_tokens": 200, "temperature": 1.0}
    extra = {"extra_body": {"max_reasoning_tokens": 4, "seed": 4}}
    first = sdk.responses.create(input="What is 2 + 3? Use the tool.", tool_choice="required", **request, **extra)
    assert first.status == "completed" and first.tool_choice == "required" and first.tools[0].name == "add"
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), ADD["function"]["parameters"])
    outputs = [{"type": "function_call_output", "call_id": call.call_id, "output": "5"} for call in calls]
    second = sdk.responses.create(
        input=[{"role": "user", "content": "What is 2 + 3? Use the tool."}, *[c.model_dump() for c in calls], *outputs],
        **request,
        **extra,
    )
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens > first.usage.input_tokens
    with sdk.responses.stream(
        input="What is 2 + 3? Use the tool.", tool_choice="required", **request, **extra
    ) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in events
    assert [(i.name, i.arguments) for i in streamed.output if i.type == "function_call"] == [
        (c.name, c.arguments) for c in calls
    ]
