"""Response bodies of the REST API's jobs: how a job (`JobPublic`, built from its row), its samples,
its vote and a key's usage are shown. What a job asks for is in ponder/service/schemas.py."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasPath, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from ponder.service.logprobs import chat_entries, unpack
from ponder.service.response_format import answers_json, parsed_json
from ponder.service.tables import Job, JobStatus

if TYPE_CHECKING:  # (the tokenizers library: the webhooks worker shows jobs without it)
    from ponder.engine.tokenizer import Tokenizer


class RowView:
    """A table row as a response model reads it (`from_attributes`): the row's attributes, except
    the `derived` values given here. Passing the row itself as a derived value lets a nested part
    (a job's usage, timings) read its own fields from the same row."""

    def __init__(self, row: Any, **derived: Any) -> None:
        self._row, self._derived = row, derived

    def __getattr__(self, name: str) -> Any:
        return self._derived[name] if name in self._derived else getattr(self._row, name)


class Usage(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int
    draft_tokens: int = Field(description="Speculative decoding: draft tokens the engine verified for this job")
    accepted_draft_tokens: int = Field(description="Of those, the ones it accepted")
    draft_acceptance_rate: float | None = Field(description="accepted / draft tokens; null when none were drafted")


class JobProgress(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    completion_tokens: int
    max_tokens: int = Field(validation_alias=AliasPath("request", "max_tokens"))


class Timings(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    created_at: datetime
    started_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime


class TopLogprob(BaseModel):
    token: str = Field(description="The token as text (bytes that are part of a character escaped, as \\xe4)")
    logprob: float = Field(description="Under the model's distribution there, before sampling changes")
    bytes: list[int] | None = Field(description="The token's bytes (a character may span tokens)")


class TokenLogprobPublic(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens there, most likely first")


class LogprobsPublic(BaseModel):
    """OpenAI's chat `logprobs`: every output token, the thinking's included (as vLLM shows them)."""

    content: list[TokenLogprobPublic] | None
    refusal: list[TokenLogprobPublic] | None = None


def shown_logprobs(packed: list[str] | None, tokenizer: Tokenizer | None) -> list[dict] | None:
    """Each sample's kept values as LogprobsPublic's fields (None: the job keeps none)."""
    if not packed or tokenizer is None:
        return None
    return [{"content": chat_entries(unpack(values), tokenizer)} for values in packed]


def _spelled_values(job: Job, tokenizer: Tokenizer) -> dict[str, Any]:
    """The job's kept values as shown: the prompt's, sample 0's, and each sample's with its fields."""
    parts: dict[str, Any] = {}
    if job.prompt_logprobs:
        parts["prompt_logprobs"] = {"content": chat_entries(unpack(job.prompt_logprobs), tokenizer)}
    if shown := shown_logprobs(job.logprobs, tokenizer):
        parts["logprobs"] = shown[0]
        if job.samples:
            parts["samples"] = [sample | {"logprobs": shown[sample["index"]]} for sample in job.samples]
    return parts


class SamplePublic(BaseModel):
    """One sample of an n-sample job."""

    index: int
    content: str | None = None
    reasoning_content: str | None = None
    answer: str | None = None
    finish_reason: str | None = None
    parsed: Any = Field(None, description="A JSON answer (response_format), parsed: once the sample ended with stop")
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: LogprobsPublic | None = Field(None, description="With logprobs: the sample's tokens' values")

    @classmethod
    def stored_fields(cls) -> list[str]:
        """What a job's `samples` column keeps of each sample (`parsed` is derived when shown; the
        log probabilities are the job's `logprobs` column's)."""
        return [name for name in cls.model_fields if name not in ("parsed", "logprobs")]


class VoteGroupPublic(BaseModel):
    answer: str = Field(description="The group's representative: its earliest finished sample's answer")
    count: int
    samples: list[int] = Field(description="Sample indices, in the order they finished")


class VotePublic(BaseModel):
    """The majority vote over an n-sample job's `\\boxed{}` answers (equal per math-verify)."""

    answer: str | None = Field(
        description="The largest group's answer (ties: the earliest finished); null: none parsed"
    )
    count: int
    n: int
    agreement: float = Field(description="count / n")
    groups: list[VoteGroupPublic] = Field(description="Largest first")
    unparsed: list[int] = Field(description="Samples whose answer math-verify could not parse (or that had none)")


class JobDeleted(BaseModel):
    """What DELETE /v1/jobs/{id} answers: the job's prompt and output are erased (its usage stays)."""

    id: uuid.UUID
    object: Literal["job.deleted"] = "job.deleted"
    deleted: bool = True


class JobPublic(BaseModel):
    # Built from a Job row: JobPublic.model_validate(job). (A docstring would become its OpenAPI description.)
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    progress: JobProgress
    content: str | None = None
    reasoning_content: str | None = None
    answer: str | None = Field(None, description="The content's last \\boxed{}; jobs with n > 1: the vote's answer")
    finish_reason: str | None = None
    parsed: Any = Field(
        None, description="A JSON answer (response_format json_object or json_schema), parsed: once it ended with stop"
    )
    error: str | None = None
    samples: list[SamplePublic] | None = Field(
        None, description="Jobs with n > 1: every sample once the job ends (content etc. above are sample 0's)"
    )
    vote: VotePublic | None = Field(None, description="Jobs with n > 1: the vote over the samples' answers")
    stopped_early: bool = Field(False, description="The vote stopped the samples still running (vote.early_stop)")
    early_stop_unspent_tokens: int = Field(
        0,
        description="The max_tokens budget the stopped samples had left: an upper bound on the tokens early "
        "stopping saved (a sample may have ended sooner on its own)",
    )
    usage: Usage
    timings: Timings
    attempts: int
    faults: int = Field(
        description="Attempts that ended with their worker gone; the job fails when they reach max_attempts"
    )
    resumed_tokens: int = Field(
        description="The completion tokens the last attempt started from (a re-run resumes from its checkpoint)"
    )
    wasted_tokens: int = Field(
        description="Tokens earlier attempts generated and a re-run threw away (past their last checkpoint)"
    )
    restart_reason: str | None = Field(None, description="Why the last re-run could not resume and started over")
    max_batch_size: int = Field(description="The most sequences the engine ran in one step with this job")
    metadata: dict[str, str] = Field(validation_alias="meta")
    webhook_url: str | None = None
    logprobs: LogprobsPublic | None = Field(
        None, description="With logprobs: sample 0's output tokens' values, once the job has ended"
    )
    prompt_logprobs: LogprobsPublic | None = Field(
        None, description="With prompt_logprobs: the prompt's tokens' values, from its second token"
    )

    @classmethod
    def of(cls, job: Job, tokenizer: Tokenizer) -> JobPublic:
        """The job as shown, its log probabilities' tokens spelled by the served model's tokenizer."""
        return cls.model_validate(job, context={"tokenizer": tokenizer})

    @model_validator(mode="before")
    @classmethod
    def _nested_parts(cls, value: Any, info: ValidationInfo) -> Any:
        """progress, usage and timings read their fields from the same row."""
        if not isinstance(value, Job):
            return value
        # the log probabilities are kept packed: shown spelled by the served tokenizer (`of`), else not
        parts: dict[str, Any] = {"progress": value, "usage": value, "timings": value}
        parts |= {"logprobs": None, "prompt_logprobs": None}
        tokenizer = (info.context or {}).get("tokenizer")
        if tokenizer is not None:  # (without one the columns stay unread: a list defers them, LISTED_WITHOUT)
            parts |= _spelled_values(value, tokenizer)
        if answers_json(value.request):
            parsed_samples = [
                sample | {"parsed": parsed_json(sample.get("content"), sample.get("finish_reason"))}
                for sample in parts.get("samples", value.samples) or []
            ]
            parts |= {
                "parsed": parsed_json(value.content, value.finish_reason),
                "samples": parsed_samples or parts.get("samples", value.samples),
            }
        return RowView(value, **parts)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic] = Field(
        description="The jobs, without their log probabilities (up to 2 Mi values each: GET /v1/jobs/{id} shows them)"
    )
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page")


class UsageRow(BaseModel):
    day: str
    model: str
    jobs: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int
    draft_tokens: int
    accepted_draft_tokens: int


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    data: list[UsageRow]
