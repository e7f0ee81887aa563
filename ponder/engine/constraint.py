"""What a request's answer must be (`SamplingParams.constraint`): a JSON schema, a JSON object, a
regular expression, a list of choices or a Lark grammar, compiled by llguidance (chosen over
xgrammar: docs/benchmarks.md#grammar-libraries-for-constrained-decoding-benchmarksgrammar_librariespy-issue-25).
Torch-free and model-free: the API checks a constraint (`Constraint(...)` raises ConfigError) with
no model loaded; ponder/engine/grammar.py holds it to it while sampling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from ponder.engine.errors import ConfigError

# After `</think>` a reasoning model writes a line break or two before the answer (R1: "\n\n"; the
# thinking budget's forced tag ends with them too); a few, not any number: a model may not spend
# its max_tokens on them.
_WHITESPACE_THEN_ANSWER = "start: /[ \\t\\r\\n]{0,4}/ @answer"


class ConstraintKind(StrEnum):
    json_schema = "json_schema"  # spec: the schema, as JSON text
    json_object = "json_object"  # spec: unused; any JSON object
    regex = "regex"  # spec: the regular expression the whole answer matches
    choice = "choice"  # choices: the answer is exactly one of them
    grammar = "grammar"  # spec: a Lark grammar (llguidance's dialect: its `start` rule is the answer)


@dataclass(frozen=True)
class Constraint:
    """What the answer must be. Checked when made: a schema, regex or grammar llguidance cannot
    compile raises ConfigError (the API's 400), never a failure inside a batch."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", ConstraintKind(self.kind))  # a plain string names one too
        except ValueError:
            raise ConfigError(f"unknown constraint kind {self.kind!r}") from None
        if self.kind == ConstraintKind.choice and not (self.choices and all(isinstance(c, str) for c in self.choices)):
            raise ConfigError("a choice constraint needs at least one string choice")
        if self.kind in (ConstraintKind.json_schema, ConstraintKind.regex, ConstraintKind.grammar) and not self.spec:
            raise ConfigError(f"a {self.kind.value} constraint needs its {self.kind.value}")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(llguidance_grammar(self, False))
        if is_error:
            raise ConfigError(f"{self.kind.value} constraint cannot be compiled: {messages[0].strip()}")


@lru_cache(maxsize=256)
def llguidance_grammar(constraint: Constraint, after_reasoning: bool) -> str:
    """The constraint as llguidance's grammar (a JSON list of grammars, the first the start);
    `after_reasoning`: whitespace may come first."""
    answer = _answer_grammar(constraint)
    if after_reasoning:
        grammars = [{"lark_grammar": _WHITESPACE_THEN_ANSWER}, {**answer, "name": "answer"}]
    else:
        grammars = [answer]
    return json.dumps({"grammars": grammars})


# Compact JSON (`{"a":1,"b":[2]}`): with whitespace free between tokens a model may spend its
# max_tokens on indentation (random weights always do); a schema's own "x-guidance" options win.
_JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False}


def _answer_grammar(constraint: Constraint) -> dict:
    match constraint.kind:
        case ConstraintKind.json_schema:
            try:
                schema = json.loads(constraint.spec)
            except json.JSONDecodeError as e:
                raise ConfigError(f"json_schema constraint: the schema is not JSON ({e})") from e
            return _json_grammar(schema)
        case ConstraintKind.json_object:
            return _json_grammar({"type": "object"})
        case ConstraintKind.regex:
            return json.loads(llguidance.LLMatcher.grammar_from_regex(constraint.spec))["grammars"][0]
        case ConstraintKind.choice:  # Lark string literals take JSON's escapes
            return {"lark_grammar": "start: " + " | ".join(json.dumps(choice) for choice in constraint.choices)}
        case ConstraintKind.grammar:
            return {"lark_grammar": constraint.spec}


def _json_grammar(schema: object) -> dict:
    if not isinstance(schema, dict):
        raise ConfigError("json_schema constraint: the schema must be a JSON object")
    return json.loads(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_LAYOUT))["grammars"][0]
