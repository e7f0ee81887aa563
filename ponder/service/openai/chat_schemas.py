"""Request and response bodies of `/v1/models` and `/v1/chat/completions`, in OpenAI's shapes
(ponder/service/openai/response_schemas.py has `/v1/responses`'). A chat completion or response request is mapped onto a
`JobCreate`, which keeps the bounds of every sampling field (ponder/service/openai/chat.py:job_create):
only OpenAI's own rules live here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ponder.engine.config import MAX_LOGIT_BIAS_ENTRIES
from ponder.service.function_tools import MAX_TOOLS, FunctionTool, ToolCallPublic, ToolChoice
from ponder.service.job_public import LogprobsPublic
from ponder.service.response_format import ResponseFormat, StructuredOutputs
from ponder.service.schemas import Bias, Penalty
from ponder.service.tables import Job

ReasoningEffort = Literal["low", "medium", "high"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model's files were made or fetched")
    owned_by: str = "ponder"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def joined_text(value: Any, kinds: tuple[str, ...]) -> Any:
    """A list of text parts ({"type": <one of kinds>, "text": ...}) as one string; other values as they are."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise ValueError(f"only text content parts are supported, not {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def check_no_effect(table: dict[str, tuple[Callable[[Any], bool], str]], name: str, value: Any) -> Any:
    harmless, why = table[name]
    if not harmless(value):
        raise ValueError(why)
    return value


class ChatMessage(BaseModel):
    """A message as OpenAI's chat API takes it: text, an assistant's tool calls, a tool's result."""

    model_config = ConfigDict(extra="forbid")

    # `developer` is OpenAI's newer name for `system`.
    role: Literal["developer", "system", "user", "assistant", "tool"]
    tool_calls: list[ToolCallPublic] | None = Field(
        None, max_length=MAX_TOOLS, description="assistant: the calls it made"
    )
    tool_call_id: str | None = Field(None, max_length=200, description="tool: the call this is the result of")
    content: str = Field(
        None,  # required, except in an assistant message with tool_calls (the validator says)
        validate_default=True,
        description="A string, or a list of text parts ({'type': 'text', 'text': ...}); null with tool_calls",
    )
    name: str | None = Field(None, description="Accepted, not used: the chat template has no speaker names")
    # An assistant message passed back as the API returned it. Its reasoning is dropped (R1's
    # usage rules: earlier turns' reasoning is not part of the next prompt); the rest is empty.
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    function_call: Any = None
    audio: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any, info) -> Any:
        if value is None:
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return ""
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return joined_text(value, ("text",))

    @field_validator("function_call", "audio")
    @classmethod
    def _nothing_else(cls, value: Any) -> Any:
        if value:
            raise ValueError("function_call (the deprecated form of tool_calls) and audio are not supported")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(None, description="A last chunk, with no choices, carries the usage")
    include_obfuscation: bool | None = Field(None, description="Accepted, not used")


# Parameters accepted only at the values that change nothing, as OpenAI itself would take them;
# any other value asks for something Ponder does not do: a 400 naming the parameter and why.
_ONLY_AT_NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: v is None, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], 'only text output is supported (["text"])'),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
}


class ChatCompletionCreate(BaseModel):
    """OpenAI's chat completion request; each becomes an ordinary Ponder job. Unknown fields are
    refused (400 naming the field), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="Completion tokens at most, reasoning included")
    max_tokens: int | None = Field(None, description="The older name; max_completion_tokens wins when both are given")
    temperature: float | None = Field(None, description="Default 0.6 (DeepSeek-R1's recommendation), not OpenAI's 1")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="A thinking budget: 20%, 50% or 80% of the completion tokens; unset: none"
    )
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, description="Kept in the job's metadata as `user` (unless metadata has one)")
    n: int | None = Field(None, description="Choices: samples of one job (the prompt is prefilled once, then forked)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    # OpenAI's penalties and logit_bias (token ids as strings); JobCreate checks their bounds again.
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)

    # Ponder's own and vLLM's extras (OpenAI's SDK sends them with extra_body={...}); as in POST /v1/jobs.
    top_k: int | None = None
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False, description="vLLM's: 1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's: 0 = off")
    min_tokens: int | None = Field(
        None, ge=0, description="vLLM's: no EOS, stop token or stop string before this many (at most max_tokens)"
    )
    max_reasoning_tokens: int | None = Field(None, description="A thinking budget; wins over reasoning_effort")
    math: bool | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: the answer follows a JSON schema, a regex, a choice list or a Lark grammar"
    )

    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the answer (after the reasoning) is held to it"
    )

    tools: list[FunctionTool] | None = Field(None, description="Functions the model may call")
    tool_choice: ToolChoice | None = Field(None, description="auto (with tools), none, required, or a named function")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call")

    # Accepted and ignored: they change nothing here.
    store: bool | None = Field(None, description="Every request is stored as a job anyway")
    service_tier: str | None = None
    prompt_cache_key: str | None = Field(None, description="Ponder's prefix cache needs no key")
    safety_identifier: str | None = None

    logprobs: bool | None = Field(None, description="Each output token's log probability (the thinking's too)")
    top_logprobs: int | None = Field(None, description="With logprobs: this many most likely alternatives (0-20)")

    # Accepted only at values with no effect (_ONLY_AT_NO_EFFECT).
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator(*_ONLY_AT_NO_EFFECT)
    @classmethod
    def _no_effect(cls, value: Any, info) -> Any:
        return check_no_effect(_ONLY_AT_NO_EFFECT, info.field_name, value)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Reasoning tokens included")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def from_job(cls, job: Job) -> ChatUsage:
        return cls(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            total_tokens=job.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=job.cached_tokens),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=job.reasoning_tokens),
        )


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer: the text after </think> (before any tool calls)")
    reasoning_content: str | None = Field(None, description="The thinking: the text before </think>")
    reasoning: str | None = Field(None, description="The same text, under the name vLLM and OpenRouter use")
    refusal: None = None
    tool_calls: list[ToolCallPublic] | None = Field(None, description="The calls the answer made (with tools)")


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: str = Field(description="stop (end of text or a stop string), length (max tokens), tool_calls")
    logprobs: LogprobsPublic | None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<the job's id>: the job is at /v1/jobs/<id>")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any] = Field(description="role; reasoning_content and reasoning; content; tool_calls")
    finish_reason: str | None = None
    logprobs: LogprobsPublic | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None
