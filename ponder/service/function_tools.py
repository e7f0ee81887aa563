"""Function tools, as OpenAI's chat API takes them: the tools a job may call, `tool_choice`, the
conversation's earlier calls and their results, and the calls read back from an answer. The
model's own syntax is ponder/engine/tool_calls.py's (picked from its chat template).

- **The prompt.** A template that renders `tools` gets them as transformers passes them (the
  `tools` variable); one that does not (R1's, the byte-level tinies') gets them in a system
  message that also shows the call syntax. An earlier assistant turn's `tool_calls` go to a
  template that renders them; otherwise they are written into its content in the model's syntax.
- **The choice.** `auto` (the default with tools): the model calls or answers, and its answer is
  read back for calls. `required` or a named function: the answer is held by a grammar to calls
  (of that function) whose arguments are valid under its `parameters`. `none`: no calls are read.
- **The calls** come back as `tool_calls` with `finish_reason: "tool_calls"`; with
  `parallel_tool_calls: false` the grammar allows one call."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ponder.engine.constraint import Constraint, ConstraintKind
from ponder.engine.tool_calls import (
    ToolCall,
    ToolCallFormat,
    format_calls,
    parse_tool_calls,
    tool_grammar,
    tools_instructions,
)
from ponder.service.response_format import compiled, schema_text

MAX_TOOLS = 128  # as OpenAI


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema")
    strict: bool | None = Field(None, description="Accepted; with tool_choice required or named, always enforced")

    @field_validator("parameters")
    @classmethod
    def _compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return compiled_parameters(value)


def compiled_parameters(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """A function's `parameters`, checked to compile as a JSON schema (ValueError if not)."""
    if parameters is not None:
        compiled(lambda: Constraint(ConstraintKind.json_schema, schema_text(parameters)))
    return parameters


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000, description="JSON text")


class ToolCallPublic(BaseModel):
    """A call, in a completion's message and in an assistant message passed back."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=200)
    type: Literal["function"] = "function"
    function: CalledFunction


def check_tool_choice(tools: list[FunctionTool] | None, choice: ToolChoice | None) -> None:
    """Raises ValueError when the choice names no tool, or asks for calls with no tools."""
    names = [tool.function.name for tool in tools or []]
    if len(set(names)) < len(names):
        raise ValueError("tools: each function's name must be unique")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not one of the tools")
    if choice not in (None, "none") and not names:
        raise ValueError("tool_choice needs tools")


def calls_forced(request: dict[str, Any]) -> bool:
    """Whether a stored request holds its answer to calls (`required` or a named function)."""
    choice = request.get("tool_choice")
    return bool(request.get("tools")) and (choice == "required" or isinstance(choice, dict))


def reads_calls(request: dict[str, Any]) -> bool:
    """Whether a stored request's answer is read back for calls (tools, and a choice not `none`)."""
    return bool(request.get("tools")) and request.get("tool_choice") != "none"


def tool_constraint(request: dict[str, Any], format: ToolCallFormat) -> Constraint | None:
    """The grammar a stored request's answer is held to: calls, when they are forced."""
    if not calls_forced(request):
        return None
    tools, choice = request["tools"], request["tool_choice"]
    if isinstance(choice, dict):
        tools = [tool for tool in tools if tool["function"]["name"] == choice["function"]["name"]]
    parallel = request.get("parallel_tool_calls") is not False and not isinstance(choice, dict)
    return Constraint(ConstraintKind.grammar, tool_grammar(format, tools, parallel))


def prompt_conversation(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None, format: ToolCallFormat
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template variables) for rendering: earlier calls and the tools placed where
    the model's template (or, lacking one, the model's syntax) puts them."""
    template = template or ""
    renders_calls = "tool_calls" in template
    rendered = [_with_calls(message, renders_calls, format) for message in messages]
    if not tools:
        return rendered, {}
    if "tools" in template.replace("tool_calls", ""):
        return rendered, {"tools": tools}
    return [{"role": "system", "content": tools_instructions(format, tools)}, *rendered], {}


def _with_calls(message: dict[str, Any], renders_calls: bool, format: ToolCallFormat) -> dict[str, Any]:
    calls = message.get("tool_calls")
    message = {key: value for key, value in message.items() if value is not None}
    if not calls:
        message.pop("tool_calls", None)
        return message
    if renders_calls:
        return message
    written = format_calls(format, [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    message.pop("tool_calls")
    return {**message, "content": f"{message.get('content') or ''}{written}"}


def answer_calls(
    request: dict[str, Any], content: str | None, format: Callable[[], ToolCallFormat], call_id: str
) -> tuple[str | None, list[ToolCallPublic]]:
    """(content, calls) of an answer: its text before the calls (None when blank), and the calls
    with ids made from `call_id` (stable: the same job shows the same ids). `format`: the served
    model's syntax, asked for only when the request has tools."""
    if content is None or not reads_calls(request):
        return content, []
    text, calls = parse_tool_calls(format(), content)
    public = [
        ToolCallPublic(id=f"call_{call_id}_{i}", function=CalledFunction(name=call.name, arguments=call.arguments))
        for i, call in enumerate(calls)
    ]
    return (text if text.strip() else None, public) if calls else (content, [])


def call_id_of(job_id: uuid.UUID, sample: int) -> str:
    return f"{job_id.hex[:16]}{sample}" if sample else job_id.hex[:16]


def as_json(value: Any) -> Any:
    """A request's fields as they are stored (models as JSON values), whether validated or read back."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value
