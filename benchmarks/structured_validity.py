"""Validity, measured (issue 25): seeded sampled requests at temperature 1.0 on tiny-r1, whose
weights are random, so only the grammar makes its answers valid; five schemas (nested objects,
arrays with bounds, enums, numbers with ranges, required and optional properties). Every answer
that finished (`stop`) must validate with `jsonschema`, an implementation independent of the
grammar library; the reasoning before `</think>` stays free text, which no schema admits.

    python benchmarks/structured_validity.py [--per-schema 40]   # 200 requests

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
        errors = [e.message for e in jsonschema.Draft202012Validator(SCHEMAS[name]).iter_errors(json.loads(sample.content))]
        if errors:
            result.invalid.append((name, sample.content, errors))
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
    result = measure(LLM("tiny-r1"), args.per_schema)
    for name, answer, errors in result.invalid:
        print(f"INVALID {name}: {answer!r}: {errors}")
    print(
        f"RESULT structured_validity model=tiny-r1 requests={result.requests} finished={result.finished} "
        f"valid={result.finished - len(result.invalid)} reasoning_admitted={len(result.admitted_reasoning)}"
    )


if __name__ == "__main__":
    main()
