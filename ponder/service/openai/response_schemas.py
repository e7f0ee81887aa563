"""Request and response bodies of `/v1/responses` (OpenAI's Responses API), in OpenAI's shapes.
A response request is mapped onto a `JobCreate`, which keeps the bounds of every sampling field
(ponder/service/openai/common.py:job_create): only OpenAI's own rules live here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ponder.service.function_tools import FunctionTool, compiled_parameters
from ponder.service.job_public import TokenLogprobPublic
from ponder.service.openai.chat_schemas import (
    CompletionTokensDetails,
    PromptTokensDetails,
    check_no_effect,
    joined_text,
)
from ponder.service.openai.reasoning_items import (
    REASONING_INCLUDE,
    ItemStatus,
    ReasoningInput,
    ReasoningItem,
    ReasoningRequest,
)
from ponder.service.response_format import JsonSchemaFormat, ResponseFormat, StructuredOutputs
from ponder.service.tables import Job


class InputMessage(BaseModel):
    """A message of a response's `input`: text only. An output `message` item passed back as the
    API returned it (with its id and status) is one too."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    # `developer` is OpenAI's newer name for `system`.
    role: Literal["developer", "system", "user", "assistant"]
    content: str = Field(description="A string, or a list of input_text (or, passed back, output_text) parts")
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        return joined_text(value, ("input_text", "output_text"))


class FunctionCallInput(BaseModel):
    """An earlier `function_call` output item, passed back as the API returned it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str = Field(max_length=200)
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000, description="JSON text")
    id: str | None = None
    status: str | None = None
    # Passed back as the SDK returns them; nothing here uses them.
    namespace: str | None = None
    caller: Any = None
    async_: Any = Field(None, alias="async")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FunctionCallOutput(BaseModel):
    """A call's result: the `tool` message of chat completions."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=200)
    output: str = Field(max_length=1_000_000, description="A string, or a list of input_text parts")
    id: str | None = None
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        return joined_text(value, ("input_text", "output_text"))


def _item_type(value: Any) -> str:
    """An input item's union tag: its type (a message may leave it out), in angle brackets, which
    an error's `param` leaves out (ponder/service/errors.py:describe_validation_error)."""
    kind = (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"
    return f"<{kind}>"


InputItem = Annotated[
    Annotated[InputMessage, Tag("<message>")]
    | Annotated[FunctionCallInput, Tag("<function_call>")]
    | Annotated[FunctionCallOutput, Tag("<function_call_output>")]
    | Annotated[ReasoningInput, Tag("<reasoning>")],
    Discriminator(_item_type),
]


class ResponseFunctionTool(BaseModel):
    """The Responses API's function tool: chat's, with the function's fields beside `type`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return compiled_parameters(value)

    def chat_tool(self) -> FunctionTool:
        return FunctionTool(type="function", function=self.model_dump(exclude={"type"}, exclude_none=True))


class ResponseNamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(max_length=64)


class TextFormat(JsonSchemaFormat):
    """The Responses API's `text.format`: chat's `response_format`, with the json_schema's fields
    beside `type` instead of under `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _compiles(self) -> TextFormat:
        if self.type == "json_schema" and self.name is None:
            raise ValueError('a "json_schema" format needs its name')
        if self.type != "json_schema" and self.model_fields_set - {"type"}:
            raise ValueError(f'a "{self.type}" format has only its type')
        self.response_format()  # the schema compiles
        return self

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        schema = JsonSchemaFormat.model_validate(self.model_dump(exclude={"type"}, exclude_none=True))
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Any = None

    @field_validator("verbosity")
    @classmethod
    def _default_verbosity(cls, value: Any) -> Any:
        if value not in (None, "medium"):
            raise ValueError("only the default verbosity (medium) is supported")
        return value


class ResponseStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = Field(None, description="Accepted, not used: no event is padded")


# As _ONLY_AT_NO_EFFECT, for the Responses API's parameters.
_RESPONSE_ONLY_AT_NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tool_calls": (lambda v: v is None, "max_tool_calls is not supported (parallel_tool_calls: false allows one)"),
    "previous_response_id": (
        lambda v: v is None,
        "previous_response_id is not supported: pass the earlier turns in `input`",
    ),
    "conversation": (lambda v: v is None, "conversations are not supported: pass the earlier turns in `input`"),
    "prompt": (lambda v: v is None, "prompt templates are not supported"),
    "truncation": (lambda v: v in (None, "disabled"), 'only "disabled" is supported (input is never truncated)'),
}


# What `include` may name: the answer's log probabilities (with `top_logprobs` alternatives), and
# the reasoning sealed for a later turn (ponder/service/openai/reasoning_items.py).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDABLE = (LOGPROBS_INCLUDE, REASONING_INCLUDE)


class ResponseCreate(BaseModel):
    """OpenAI's Responses API request; each becomes an ordinary Ponder job. Unknown fields are
    refused (400 naming the field), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    input: list[InputItem] = Field(
        description="A string (one user message), or a list of messages, function_call, function_call_output and"
        " reasoning items (a reasoning item is dropped, its encrypted_content checked)"
    )
    instructions: str | None = Field(None, description="A system message before the input")
    max_output_tokens: int | None = Field(None, description="Output tokens at most, reasoning included")
    temperature: float | None = Field(None, description="Default 0.6 (DeepSeek-R1's recommendation), not OpenAI's 1")
    top_p: float | None = None
    reasoning: ReasoningRequest | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, description="Kept in the job's metadata as `user` (unless metadata has one)")
    background: bool | None = Field(None, description="Answer at once (queued); poll GET /v1/responses/{id}")
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    text: TextRequest | None = None

    # Ponder's own (OpenAI's SDK sends them with extra_body={...}); as in POST /v1/jobs.
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    max_reasoning_tokens: int | None = Field(None, description="A thinking budget; wins over reasoning.effort")
    math: bool | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: the answer follows a JSON schema, a regex, a choice list or a Lark grammar"
    )

    tools: list[ResponseFunctionTool] | None = Field(None, description="Functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = Field(
        None, description="auto (with tools), none, required, or a named function"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")

    # Accepted and ignored: they change nothing here.
    store: bool | None = Field(None, description="Every response is stored (as a job) anyway")
    service_tier: str | None = None
    prompt_cache_key: str | None = Field(None, description="Ponder's prefix cache needs no key")
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    include: list[str] | None = Field(None, description="message.output_text.logprobs, reasoning.encrypted_content")
    top_logprobs: int | None = Field(None, description="The most likely alternatives per token (0-20), with logprobs")

    # Accepted only at values with no effect (_RESPONSE_ONLY_AT_NO_EFFECT).
    max_tool_calls: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    truncation: Any = None

    @property
    def wants_logprobs(self) -> bool:
        """The answer's log probabilities are asked for (top_logprobs alone asks too)."""
        return LOGPROBS_INCLUDE in (self.include or []) or bool(self.top_logprobs)

    @field_validator("input", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        return value

    @field_validator(*_RESPONSE_ONLY_AT_NO_EFFECT)
    @classmethod
    def _no_effect(cls, value: Any, info) -> Any:
        return check_no_effect(_RESPONSE_ONLY_AT_NO_EFFECT, info.field_name, value)

    @field_validator("include")
    @classmethod
    def _includable(cls, value: list[str] | None) -> list[str] | None:
        if unknown := [name for name in value or [] if name not in INCLUDABLE]:
            raise ValueError(f"{unknown[0]!r} cannot be included (only {', '.join(INCLUDABLE)})")
        return value


ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprobPublic] = Field(
        default_factory=list, description="With include message.output_text.logprobs: the answer's tokens' values"
    )


class FunctionCallItem(BaseModel):
    id: str = Field(description="fc_<the job's id, hex>_<the call's index>")
    type: Literal["function_call"] = "function_call"
    call_id: str = Field(description="What the call's function_call_output names")
    name: str
    arguments: str = Field(description="JSON text")
    status: ItemStatus = "completed"


class MessageItem(BaseModel):
    id: str = Field(description="msg_<the job's id, hex>")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(description="The answer: the text after </think>")
    status: ItemStatus


class InputTokensDetails(PromptTokensDetails):
    # Required by the SDK's Response type (openai>=3.5x validates it so).
    cache_write_tokens: int = Field(
        description="Prompt tokens computed for this request, not served from the cache (the prefix cache keeps"
        " their full blocks for later requests)"
    )


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Reasoning tokens included")
    output_tokens_details: CompletionTokensDetails
    total_tokens: int

    @classmethod
    def from_job(cls, job: Job) -> ResponseUsage:
        return cls(
            input_tokens=job.prompt_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=job.cached_tokens, cache_write_tokens=job.prompt_tokens - job.cached_tokens
            ),
            output_tokens=job.completion_tokens,
            output_tokens_details=CompletionTokensDetails(reasoning_tokens=job.reasoning_tokens),
            total_tokens=job.total_tokens,
        )


class ResponseErrorBody(BaseModel):
    code: str = Field(description="job_failed or job_expired")
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


OutputItem = ReasoningItem | MessageItem | FunctionCallItem


class ResponseObject(BaseModel):
    id: str = Field(description="resp_<the job's id, hex>: the job is at /v1/jobs/<id>")
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    background: bool
    error: ResponseErrorBody | None = None
    incomplete_details: IncompleteDetails | None = None
    max_output_tokens: int | None = Field(description="The job's max_tokens (the deployment's default if unset)")
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    reasoning: ReasoningRequest | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = Field("auto", description="As the request gave it (auto by default)")
    tools: list[Any] = Field(default_factory=list, description="The request's tools")
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = Field(None, description="Once the response has ended")
