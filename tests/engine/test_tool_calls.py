"""Tool calls in the models' own syntaxes (ponder/engine/tool_calls.py): the syntax picked from the
template, calls read back from an answer, and `tool_grammar` making a random model call: every
call it writes parses and its arguments validate (`jsonschema`) against the function's
`parameters`, DeepSeek's syntax on tiny-r1 (after its reasoning) and Hermes' on tiny-llama."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ponder.engine.config import SamplingParams
from ponder.engine.constraint import Constraint
from ponder.engine.tool_calls import (
    ToolCall,
    ToolCallFormat,
    format_calls,
    parse_tool_calls,
    tool_call_format,
    tool_grammar,
    tools_instructions,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def test_the_syntax_is_the_templates(make_llm):
    assert tool_call_format(make_llm("tiny-r1").tokenizer.chat_template) == ToolCallFormat.deepseek
    assert tool_call_format(make_llm("tiny-llama").tokenizer.chat_template) == ToolCallFormat.hermes
    assert tool_call_format(None) == ToolCallFormat.hermes


@pytest.mark.parametrize("format", list(ToolCallFormat))
def test_calls_written_in_a_syntax_read_back_as_the_same_calls(format):
    calls = [ToolCall("get_weather", '{"city": "Oslo", "unit": "c"}'), ToolCall("add", '{"a": 1, "b": 2}')]
    assert parse_tool_calls(format, "Let me check." + format_calls(format, calls)) == ("Let me check.", calls)
    assert parse_tool_calls(format, "No call here.") == ("No call here.", [])
    broken = format_calls(format, [ToolCall("add", '{"a": 1,')])  # not JSON: the answer is text
    assert parse_tool_calls(format, broken) == (broken, [])
    assert "get_weather" in tools_instructions(format, TOOLS) and "FUNCTION_NAME" in tools_instructions(format, TOOLS)


@pytest.mark.parametrize("model", ["tiny-r1", "tiny-llama"])
def test_the_grammar_makes_a_random_model_call_with_valid_arguments(make_llm, model):
    """Both templates open a thinking block: a budget ends it, then the calls are the answer."""
    llm = make_llm(model)
    format = tool_call_format(llm.tokenizer.chat_template)
    messages = [{"role": "user", "content": "Weather in Oslo, and 2 + 3?"}]
    for parallel in (False, True):
        grammar = tool_grammar(format, TOOLS, parallel)
        params = SamplingParams(
            temperature=1.0,
            seed=3,
            n=6,
            max_tokens=120,
            max_reasoning_tokens=6,
            constraint=Constraint("grammar", grammar),
        )
        (output,) = llm.chat(messages, params)
        finished = [sample for sample in output.outputs if sample.finish_reason == "stop"]
        assert len(finished) >= 3, [sample.text for sample in output.outputs]
        for sample in finished:
            text, calls = parse_tool_calls(format, sample.content)
            assert text.strip() == "" and calls, sample.content
            assert parallel or len(calls) == 1
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
            assert sample.reasoning_content and not parse_tool_calls(format, sample.reasoning_content)[1]


def test_one_named_function(make_llm):
    llm = make_llm("tiny-llama")
    grammar = tool_grammar(ToolCallFormat.hermes, [ADD], parallel=False)
    params = SamplingParams(
        temperature=1.0, seed=4, n=4, max_tokens=120, max_reasoning_tokens=4, constraint=Constraint("grammar", grammar)
    )
    (output,) = llm.chat([{"role": "user", "content": "2 + 3?"}], params)
    calls = [parse_tool_calls(ToolCallFormat.hermes, s.content)[1] for s in output.outputs if s.finish_reason == "stop"]
    assert calls and all([call.name for call in sample] == ["add"] for sample in calls)
