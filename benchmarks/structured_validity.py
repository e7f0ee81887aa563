"""Validity, measured (issue 25): seeded sampled requests at temperature 1.0 on tiny-r1, whose
weights are random, so only the grammar makes its answers valid; five schemas (nested objects,
arrays with bounds, enums, numbers with ranges, required and optional properties). Every answer
that finished (`stop`) must validate with `jsonschema`, an implementation independent of the
grammar library; the reasoning before `</think>` stays free text, which no schema admits. Then
as many requests with tool_choice "required" over three tools (DeepSeek's call syntax, R1's):
every call of a finished answer parses, and its arguments validate against its function's
`parameters`.

    python benchmarks/structured_validity.py [--per-schema 40]   # 200 requests, then 200 with tools

prints `RESULT structured_validity ...`; tests/engine/test_structured_validity.py runs it small."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema  # noqa: E402

from ponder.engine.config import SamplingParams  # noqa: E402
from ponder.engine.constraint import Constraint, ConstraintKind  # noqa: E402
from ponder.engine.tool_calls import parse_tool_calls, tool_call_format, tool_grammar  # noqa: E402
from ponder.service.function_tools import prompt_conversation  # noqa: E402


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_USER = _object({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": {"type": "string", "maxLength": 6}})
_DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}
SCHEMAS = {
    "nested": _object({"user": _USER}),
    "array": _object({"xs": _DIGITS}),
    "enum": _object({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", 1]}}),
    "range": _object(
        {"p": {"type": "number", "minimum": 0, "maximum": 1}, "t": {"type": "integer", "minimum": -5, "maximum": 5}}
    ),
    "optional": _object(
        {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 4}, "c": {"type": "null"}}, required=["a"]
    ),
}
MESSAGES = [{"role": "user", "content": "Answer with JSON."}]
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": SCHEMAS[schema]}}
    for name, schema in [("lookup_user", "nested"), ("sum_digits", "array"), ("set_flags", "optional")]
]


@dataclass
class Validity:
    requests: int = 0
    finished: int = 0
    invalid: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (schema, answer, errors)
    admitted_reasoning: list[str] = field(default_factory=list)  # reasoning a schema admits (none should be)


def measure(llm, per_schema: int, max_tokens: int = 80) -> Validity:
    """`per_schema` requests for each schema, run as one batch."""
    cases = [name for name in SCHEMAS for _ in range(per_schema)]
    params = [
        SamplingParams(
            temperature=1.0,
            seed=1000 + i,
            max_tokens=max_tokens,
            max_reasoning_tokens=8,  # forces </think>: the answer has the rest
            constraint=Constraint(ConstraintKind.json_schema, json.dumps(SCHEMAS[name])),
        )
        for i, name in enumerate(cases)
    ]
    result = Validity(requests=len(cases))
    for name, output in zip(cases, llm.chat([MESSAGES] * len(cases), params), strict=True):
        (sample,) = output.outputs
        if _admitted(sample.reasoning_content, SCHEMAS[name]):
            result.admitted_reasoning.append(sample.reasoning_content)
        if sample.finish_reason != "stop":
            continue
        result.finished += 1
        errors = [
            e.message for e in jsonschema.Draft202012Validator(SCHEMAS[name]).iter_errors(json.loads(sample.content))
        ]
        if errors:
            result.invalid.append((name, sample.content, errors))
    return result


def measure_tool_calls(llm, requests: int, max_tokens: int = 120) -> Validity:
    """`requests` requests that must call (tool_choice "required", parallel calls allowed); a
    finished answer whose calls do not all parse and validate counts as invalid."""
    template = llm.tokenizer.chat_template
    format = tool_call_format(template)
    messages, variables = prompt_conversation(MESSAGES, TOOLS, template, format)
    constraint = Constraint(ConstraintKind.grammar, tool_grammar(format, TOOLS, parallel=True))
    params = [
        SamplingParams(
            temperature=1.0, seed=5000 + i, max_tokens=max_tokens, max_reasoning_tokens=8, constraint=constraint
        )
        for i in range(requests)
    ]
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    result = Validity(requests=requests)
    for output in llm.chat([messages] * requests, params, **variables):
        (sample,) = output.outputs
        if sample.finish_reason != "stop":
            continue
        result.finished += 1
        text, calls = parse_tool_calls(format, sample.content)
        errors = [] if calls and not text.strip() else ["no calls parsed"]
        for call in calls:
            errors += [
                e.message
                for e in jsonschema.Draft202012Validator(parameters[call.name]).iter_errors(json.loads(call.arguments))
            ]
        if errors:
            result.invalid.append(("tools", sample.content, errors))
    return result


def _admitted(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    from ponder.engine.runtime import LLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-schema", type=int, default=40)
    args = parser.parse_args()
    llm = LLM("tiny-r1")
    result, calls = measure(llm, args.per_schema), measure_tool_calls(llm, args.per_schema * len(SCHEMAS))
    for name, answer, errors in result.invalid + calls.invalid:
        print(f"INVALID {name}: {answer!r}: {errors}")
    print(
        f"RESULT structured_validity model=tiny-r1 requests={result.requests} finished={result.finished} "
        f"valid={result.finished - len(result.invalid)} reasoning_admitted={len(result.admitted_reasoning)} "
        f"tool_requests={calls.requests} tool_finished={calls.finished} "
        f"tool_valid={calls.finished - len(calls.invalid)}"
    )


if __name__ == "__main__":
    main()
