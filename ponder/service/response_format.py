"""What shape a job's answer must have, as clients ask for it: OpenAI's `response_format` (JSON
mode, or a JSON schema) and vLLM's `structured_outputs` (a JSON schema, a regular expression, a
list of choices or a grammar). Both become the engine's Constraint (ponder/engine/constraint.py),
compiled when the request is validated: a schema, regex or grammar that cannot be compiled is the
request's 4xx, never a failure inside a batch.

The constraint holds the answer only: a reasoning model's thinking (before `</think>`) stays free
text. The schema is always enforced, `strict` or not (OpenAI's non-strict mode only hopes for it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ponder.engine.constraint import Constraint, ConstraintKind
from ponder.engine.errors import ConfigError

MAX_SPEC_CHARS = 100_000  # a schema (as JSON), regex or grammar: each is compiled by the API and by its worker
MAX_CHOICES = 256


class JsonSchemaFormat(BaseModel):
    """OpenAI's `json_schema` response format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The answer's JSON schema")
    strict: bool | None = Field(None, description="Accepted; the schema is enforced either way")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (no constraint), `json_object` (any JSON object) or
    `json_schema` (JSON valid under `json_schema.schema`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _compiles(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with type "json_schema", and only then')
        compiled(self.constraint)
        return self

    def constraint(self) -> Constraint | None:
        match self.type:
            case "json_object":
                return Constraint(ConstraintKind.json_object)
            case "json_schema":
                assert self.json_schema is not None
                return Constraint(ConstraintKind.json_schema, schema_text(self.json_schema.json_schema))
        return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (sent in extra_body): exactly one of a JSON schema, a regular
    expression the whole answer matches, the choices the answer is one of, or a Lark grammar
    (llguidance's dialect: its `start` rule is the answer)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    json_schema: dict[str, Any] | None = Field(None, alias="json", description="A JSON schema")
    regex: str | None = Field(None, max_length=MAX_SPEC_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, max_length=MAX_SPEC_CHARS)

    @model_validator(mode="after")
    def _compiles(self) -> StructuredOutputs:
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice or grammar")
        if self.choice is not None and sum(map(len, self.choice)) > MAX_SPEC_CHARS:
            raise ValueError(f"the choices have more than {MAX_SPEC_CHARS} characters in all")
        compiled(self.constraint)
        return self

    def constraint(self) -> Constraint:
        if self.json_schema is not None:
            return Constraint(ConstraintKind.json_schema, schema_text(self.json_schema))
        if self.regex is not None:
            return Constraint(ConstraintKind.regex, self.regex)
        if self.choice is not None:
            return Constraint(ConstraintKind.choice, choices=tuple(self.choice))
        assert self.grammar is not None
        return Constraint(ConstraintKind.grammar, self.grammar)


def answer_constraint(
    response_format: ResponseFormat | dict | None, structured_outputs: StructuredOutputs | dict | None
) -> Constraint | None:
    """The constraint a request's answer is held to (None: free text). Takes the models, or their
    stored dicts (a job's request as the worker reads it back)."""
    if isinstance(response_format, dict):
        response_format = ResponseFormat.model_validate(response_format)
    if isinstance(structured_outputs, dict):
        structured_outputs = StructuredOutputs.model_validate(structured_outputs)
    formatted = response_format.constraint() if response_format is not None else None
    return formatted or (structured_outputs.constraint() if structured_outputs is not None else None)


def compiled(constraint: Callable[[], Constraint | None]) -> None:
    """Raises ValueError (the request's validation error) when the constraint cannot be compiled."""
    try:
        constraint()
    except ConfigError as e:
        raise ValueError(str(e)) from None


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON schema as the constraint's text, bounded before anything compiles it."""
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"the schema is {len(text)} characters as JSON; at most {MAX_SPEC_CHARS}")
    return text


def answers_json(request: dict[str, Any]) -> bool:
    """Whether a stored request asks for a JSON answer (JSON mode, or a JSON schema)."""
    response_format, structured_outputs = request.get("response_format") or {}, request.get("structured_outputs") or {}
    return response_format.get("type") in ("json_object", "json_schema") or "json" in structured_outputs


def parsed_json(content: str | None, finish_reason: str | None) -> Any:
    """The answer of a finished JSON-constrained output as a value; None when it did not finish
    (`length`: the budget ended mid-object) or is not JSON."""
    if content is None or finish_reason != "stop":
        return None
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return None
