"""Request and response bodies of `/v1/completions`, OpenAI's legacy completions as lm-evaluation-
harness, vLLM and many scripts use them (ponder/service/openai/completions.py maps them onto jobs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ponder.engine.config import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS
from ponder.service.openai.chat_schemas import StreamOptions, check_no_effect
from ponder.service.schemas import Bias, Penalty, TokenId

# Prompts one request may carry (each is a job of its own).
MAX_PROMPTS = 64
# OpenAI's default completion length for this route.
DEFAULT_MAX_TOKENS = 16

_ONLY_AT_NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (lambda v: v in (None, ""), "suffix is not supported (no fill-in-the-middle)"),
}


class CompletionCreate(BaseModel):
    """OpenAI's legacy completion request. Each prompt becomes an ordinary Ponder job (raw text,
    or token ids taken as they are; no chat template). Unknown fields are refused (400)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="A string, token ids, or a list of either (each its own job)"
    )
    # (echo and n come before the fields whose checks read them)
    echo: bool | None = Field(None, description="The prompt before the completion (and its values, with logprobs)")
    n: int | None = Field(None, description="Samples of each prompt (prefilled once, then forked)")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0, description="0 only with echo: the prompt scored alone")
    best_of: int | None = Field(None, description="Only equal to n: no server-side ranking")
    temperature: float | None = Field(None, description="Default 0.6 (DeepSeek-R1's recommendation), not OpenAI's 1")
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's value and this many alternatives"
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Kept in the jobs' metadata as `user`")
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)

    # vLLM's extras (OpenAI's SDK sends them with extra_body={...}); as in POST /v1/jobs.
    top_k: int | None = None
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)

    # Accepted only at values with no effect.
    suffix: Any = None

    @field_validator(*_ONLY_AT_NO_EFFECT)
    @classmethod
    def _no_effect(cls, value: Any, info) -> Any:
        return check_no_effect(_ONLY_AT_NO_EFFECT, info.field_name, value)

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        if isinstance(value, list) and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _zero_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("0 needs echo: true (the prompt scored alone)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("only best_of == n is supported (no server-side ranking of samples)")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as a job takes it."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists over the choice's tokens (the prompt's first, with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (nothing precedes it)")
    top_logprobs: list[dict[str, float] | None] = Field(description="The alternatives and the token itself")
    text_offset: list[int] = Field(description="Where each token starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index x n + sample index")
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop (end of text or a stop string), length (max_tokens)")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str = Field(description="cmpl-<the first prompt's job id>; x-ponder-job-ids lists every job")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
