"""Tool calls in a model's own syntax: which syntax a model writes (picked from its chat template),
how the tools are put before it when its template has no place for them, how its answer is read
back as calls, and the grammar that makes it call (`tool_choice` "required" or a named function).

Two syntaxes, as the models are trained to write them:
- **DeepSeek** (V3, R1; the template has `<｜tool▁calls▁begin｜>`):
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`
  (one per call, `\\n` between) `<｜tool▁calls▁end｜>`.
- **Hermes** (Qwen2/2.5, Hermes, and any template that names none): one
  `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` per call.

Torch-free and model-free: the API renders prompts and reads answers with it; the engine's
grammar holds a constrained answer to `tool_grammar`. A tool is OpenAI's function tool, as a
dict: `{"type": "function", "function": {"name", "description", "parameters"}}`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_DS_CALLS_BEGIN, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN, _DS_CALL_END, _DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_DS_CALL = re.compile(
    re.escape(_DS_CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(_DS_SEP) + r"(?P<name>[^\n]*)\n```json\n"
    r"(?P<arguments>.*?)\n```" + re.escape(_DS_CALL_END),
    re.DOTALL,
)
_HERMES_BEGIN, _HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(_HERMES_BEGIN) + r"\s*(?P<body>\{.*?\})\s*" + re.escape(_HERMES_END), re.DOTALL)
# Compact JSON in the grammar, as for response formats (ponder/engine/constraint.py).
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}


class ToolCallFormat(StrEnum):
    deepseek = "deepseek"
    hermes = "hermes"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


def tool_call_format(chat_template: str | None) -> ToolCallFormat:
    """The syntax the model's template (so the model) uses for calls."""
    return ToolCallFormat.deepseek if chat_template and _DS_CALLS_BEGIN in chat_template else ToolCallFormat.hermes


def calls_start(format: ToolCallFormat) -> str:
    """The text that opens the calls: what a stream holds back until it knows whether it is one."""
    return _DS_CALLS_BEGIN if format == ToolCallFormat.deepseek else _HERMES_BEGIN


def parse_tool_calls(format: ToolCallFormat, text: str) -> tuple[str, list[ToolCall]]:
    """(the text before the calls, the calls) of an answer. A call whose arguments are not JSON
    stays text: the answer then has no calls (a model that wrote a broken call wrote text)."""
    start = text.find(calls_start(format))
    if start < 0:
        return text, []
    calls = _deepseek_calls(text[start:]) if format == ToolCallFormat.deepseek else _hermes_calls(text[start:])
    return (text[:start], calls) if calls is not None else (text, [])


def _deepseek_calls(text: str) -> list[ToolCall] | None:
    calls = []
    for match in _DS_CALL.finditer(text):
        arguments = _json_text(match["arguments"])
        if arguments is None:
            return None
        calls.append(ToolCall(match["name"].strip(), arguments))
    return calls or None


def _hermes_calls(text: str) -> list[ToolCall] | None:
    calls = []
    for match in _HERMES_CALL.finditer(text):
        try:
            body = json.loads(match["body"])
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        calls.append(ToolCall(body["name"], json.dumps(body.get("arguments", {}), ensure_ascii=False)))
    return calls or None


def _json_text(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return None


def format_calls(format: ToolCallFormat, calls: list[ToolCall]) -> str:
    """Calls as the model writes them (an earlier assistant turn, for a template without them)."""
    if format == ToolCallFormat.deepseek:
        return (
            _DS_CALLS_BEGIN
            + "\n".join(_deepseek_call(call.name) + call.arguments + _DS_TAIL for call in calls)
            + _DS_CALLS_END
        )
    return "\n".join(
        f'{_HERMES_BEGIN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{_HERMES_END}' for c in calls
    )


_JSON_FENCE, _JSON_FENCE_END = "\n```json\n", "\n```"
_DS_TAIL = _JSON_FENCE_END + _DS_CALL_END


def _deepseek_call(name: str) -> str:
    return f"{_DS_CALL_BEGIN}function{_DS_SEP}{name}{_JSON_FENCE}"


def tools_instructions(format: ToolCallFormat, tools: list[dict[str, Any]]) -> str:
    """The tools and the syntax to call them, for a model whose template has no place for tools
    (a system message; R1's template renders none)."""
    listed = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    example = format_calls(format, [ToolCall("FUNCTION_NAME", '{"ARGUMENT": "VALUE"}')])
    return (
        "You can call these functions (JSON schemas of their arguments):\n"
        f"{listed}\n\nTo call one or more, answer with exactly this syntax and nothing after it:\n{example}"
    )


def tool_grammar(format: ToolCallFormat, tools: list[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) of an answer that is calls to `tools` and nothing
    else, each call's arguments valid under its function's `parameters`; one call unless
    `parallel`."""
    functions = [tool["function"] for tool in tools]
    calls = 'call ("\\n" call)*' if parallel else "call"
    if format == ToolCallFormat.deepseek:  # its markers are tokens of their own: named, not spelled
        rules = [
            f'call_{i}: {_DS_CALL_BEGIN} "function" {_DS_SEP} {json.dumps(f["name"] + _JSON_FENCE)} '
            f"%json{json.dumps(_parameters(f))} {json.dumps(_JSON_FENCE_END)} {_DS_CALL_END}"
            for i, f in enumerate(functions)
        ]
        alternatives = " | ".join(f"call_{i}" for i in range(len(functions)))
        return "\n".join([f"start: {_DS_CALLS_BEGIN} {calls} {_DS_CALLS_END}", f"call: {alternatives}", *rules])
    one_of = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ],
        **_COMPACT,
    }
    begin, end = json.dumps(_HERMES_BEGIN + "\n"), json.dumps("\n" + _HERMES_END)
    return f"start: {calls}\ncall: {begin} %json{json.dumps(one_of)} {end}"


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return {**(function.get("parameters") or {"type": "object"}), **_COMPACT}
