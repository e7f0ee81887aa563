"""Request bodies of the REST API's jobs: what a job asks for (`JobCreate`, which the workers read
back too). How a job is shown is in ponder/service/job_public.py; webhooks' bodies are in
ponder/service/webhooks/schemas.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ponder.engine.config import (
    LOGIT_BIAS_BOUND,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_SAMPLES,
    PENALTY_BOUND,
    SamplingParams,
)
from ponder.engine.constraint import Constraint
from ponder.engine.tool_calls import ToolCallFormat
from ponder.service.function_tools import (
    MAX_TOOLS,
    FunctionTool,
    ToolCallPublic,
    ToolChoice,
    as_json,
    check_tool_choice,
    tool_constraint,
)
from ponder.service.response_format import (
    ResponseFormat,
    StructuredOutputs,
    answer_constraint,
    answers_json,
)
from ponder.service.webhooks.url_safety import MAX_URL_LENGTH


def _short_pairs(value: dict[str, str] | None) -> dict[str, str] | None:
    if value and any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
        raise ValueError("metadata keys are at most 64 characters, values at most 512")
    return value


# A job's or a batch's metadata, bounded as OpenAI bounds it (with Field(max_length=16): 16 pairs).
Metadata = Annotated[dict[str, str] | None, AfterValidator(_short_pairs)]
# OpenAI's logit_bias: token ids (JSON's string keys) to biases; the vocabulary is checked with the model's.
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_BOUND, le=LOGIT_BIAS_BOUND)]
Penalty = Annotated[float, Field(ge=-PENALTY_BOUND, le=PENALTY_BOUND)]
LogitBias = dict[Annotated[int, Field(ge=0)], Bias] | None
TokenId = Annotated[int, Field(ge=0)]  # the vocabulary is checked with the model's


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000, description="An assistant message with tool_calls may give an empty one")
    tool_calls: list[ToolCallPublic] | None = Field(None, max_length=MAX_TOOLS, description="assistant: its calls")
    tool_call_id: str | None = Field(None, max_length=200, description="tool: the call this is the result of")


class VoteOptions(BaseModel):
    """Self-consistency for a job with n > 1 (docs/architecture.md#self-consistency): the worker
    votes on the samples' answers as they finish; these say when it may stop the samples still
    running. Every n > 1 job gets a vote; these only add stopping."""

    model_config = ConfigDict(extra="forbid")

    early_stop: bool = Field(
        False, description="Stop the samples still running once the leading answer can be neither overtaken nor tied"
    )
    min_agreement: float | None = Field(
        None, gt=0, le=1, description="Stop the samples still running once one answer has this share of n"
    )
    field: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[^.]+(\.[^.]+)*$",
        description="A JSON answer's field (dot-separated keys) to group the samples by (equal values), not \\boxed{}",
    )


class JobCreate(BaseModel):
    """A reasoning job: chat `messages` (rendered with the model's chat template) or a raw `prompt`."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)
    prompt: str | list[TokenId] | None = Field(
        None, min_length=1, max_length=4_000_000, description="Raw text, or token ids (taken as they are)"
    )
    model: str | None = Field(None, max_length=200, description="Defaults to the served model")
    max_tokens: int | None = Field(None, ge=1, description="Completion tokens at most (reasoning included)")
    temperature: float = Field(0.6, ge=0, le=2, description="DeepSeek-R1 recommends 0.5-0.7")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible")
    stop: list[str] | None = Field(None, max_length=4)
    max_reasoning_tokens: int | None = Field(None, ge=0, description="Thinking budget")
    # The full sampler (docs/architecture.md, "Sample"): OpenAI's penalties and logit_bias, vLLM's extras.
    frequency_penalty: float = Field(
        0.0, ge=-PENALTY_BOUND, le=PENALTY_BOUND, description="Minus this times each token's count in the output"
    )
    presence_penalty: float = Field(
        0.0, ge=-PENALTY_BOUND, le=PENALTY_BOUND, description="Minus this for each token the output has"
    )
    repetition_penalty: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Prompt and output tokens' logits / this (x this if < 0); 1 = off"
    )
    logit_bias: LogitBias = Field(
        None,
        max_length=MAX_LOGIT_BIAS_ENTRIES,
        description="Token id -> bias in [-100, 100], added to its logit (at most 300)",
    )
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens below min_p x the top token's probability")
    min_tokens: int = Field(0, ge=0, description="No EOS, stop token or stop string before this many tokens")
    logprobs: bool = Field(
        False, description="Each output token's log probability (the model's, before temperature and penalties)"
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many most likely alternatives per token"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each prompt token's log probability, with this many alternatives"
    )
    split_reasoning: bool = Field(
        True, description="false: the output is one text, `content`, with the think tags as written (no budget)"
    )
    math: bool = Field(False, description="Append R1's maths directive (step by step, \\boxed{} answer)")
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="Samples of the prompt (prefilled once, then forked)")
    vote: VoteOptions | None = Field(None, description="n > 1: when to stop sampling early (every n > 1 job is voted)")
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's: the answer is a JSON object (json_object) or follows a JSON schema (json_schema)"
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: the answer follows a JSON schema, a regex, a choice list or a Lark grammar"
    )
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS, description="Functions the model may call")
    tool_choice: ToolChoice | None = Field(None, description="auto (with tools), none, required, or a named function")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (default true)")
    metadata: Metadata = Field(None, max_length=16)
    webhook_url: HttpUrl | None = Field(None, description="Called when the job ends")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s or len(s) > 64 for s in value):
            raise ValueError("each stop string must be 1-64 characters")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0:
            raise ValueError("top_k must be -1 (off) or >= 1")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: HttpUrl | None) -> HttpUrl | None:
        return url_length(value)

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self

    # (field validators, so that an error names its field: `logprobs` and `max_reasoning_tokens` come first)
    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("split_reasoning")
    @classmethod
    def _a_budget_needs_the_split(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("max_reasoning_tokens") is not None:
            raise ValueError("false cannot take max_reasoning_tokens: a budget ends the thinking it tells apart")
        return value

    @model_validator(mode="after")
    def _vote_needs_samples(self) -> JobCreate:
        if self.vote is not None and self.n < 2:
            raise ValueError("vote options need n > 1: a vote is over a job's samples")
        return self

    @model_validator(mode="after")
    def _one_answer_constraint(self) -> JobCreate:
        formats = [
            self.structured_outputs,
            None if self.response_format == ResponseFormat(type="text") else self.response_format,
        ]
        if sum(f is not None for f in formats) > 1:
            raise ValueError("give response_format or structured_outputs, not both")
        check_tool_choice(self.tools, self.tool_choice)
        json_answer = answers_json(self.model_dump(mode="json", include={"response_format", "structured_outputs"}))
        if self.vote is not None and self.vote.field is not None and not json_answer:
            raise ValueError("vote.field needs a JSON answer: a JSON response_format or structured_outputs.json")
        if any(f is not None for f in formats) and self.tools and self.tool_choice != "none":
            raise ValueError("an answer held to a format cannot also call tools: give one or the other")
        return self

    @classmethod
    def from_stored(cls, request: dict[str, Any]) -> JobCreate:
        """A job's stored request (this body as validated at submission, max_tokens resolved), not
        validated again: a field that rows from older versions lack takes its default from here."""
        return cls.model_construct(**request)

    def calls_constraint(self, tool_format: ToolCallFormat) -> Constraint | None:
        """The grammar this job's answer is held to when it must call its tools (None: it need not)."""
        tools = {"tools": self.tools, "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls}
        return tool_constraint(as_json(tools), tool_format)

    def sampling_params(self, max_tokens: int, tool_format: ToolCallFormat = ToolCallFormat.hermes) -> SamplingParams:
        """How the engine samples this job; `max_tokens` is the budget the API resolved,
        `tool_format` the served model's call syntax (its template's)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop or [],
            max_reasoning_tokens=self.max_reasoning_tokens,
            n=self.n,
            constraint=answer_constraint(self.response_format, self.structured_outputs)
            or self.calls_constraint(tool_format),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            # A stored request's keys are JSON's strings (from_stored does not validate).
            logit_bias={int(token): float(bias) for token, bias in (self.logit_bias or {}).items()},
            min_p=self.min_p,
            min_tokens=self.min_tokens,
            logprobs=self.kept_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            split_reasoning=self.split_reasoning,
        )

    @property
    def kept_logprobs(self) -> int | None:
        """The alternatives per token the job keeps log probabilities with; None: it keeps none."""
        return (self.top_logprobs or 0) if self.logprobs else None


_Url = TypeVar("_Url", bound=HttpUrl | None)


def url_length(value: _Url) -> _Url:
    if value is not None and len(str(value)) > MAX_URL_LENGTH:
        raise ValueError(f"longer than {MAX_URL_LENGTH} characters")
    return value
