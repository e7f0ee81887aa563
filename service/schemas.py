"""Request and response bodies of the REST API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from service.models import Job, JobStatus


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class JobCreate(BaseModel):
    """A reasoning job: chat `messages` (rendered with the model's chat template) or a raw `prompt`."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)
    prompt: str | None = Field(None, min_length=1, max_length=4_000_000)
    model: str | None = Field(None, max_length=200, description="Defaults to the served model")
    max_tokens: int | None = Field(None, ge=1, description="Completion tokens at most (reasoning included)")
    temperature: float = Field(0.6, ge=0, le=2, description="DeepSeek-R1 recommends 0.5-0.7")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible")
    stop: list[str] | None = Field(None, max_length=4)
    max_reasoning_tokens: int | None = Field(None, ge=0, description="Thinking budget")
    math: bool = Field(False, description="Append R1's maths directive (step by step, \\boxed{} answer)")
    metadata: dict[str, str] | None = Field(None, max_length=16)
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

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: HttpUrl | None) -> HttpUrl | None:
        if value is not None and len(str(value)) > 2048:
            raise ValueError("webhook_url is longer than 2048 characters")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int


class Progress(BaseModel):
    completion_tokens: int
    max_tokens: int


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime


class JobPublic(BaseModel):
    id: uuid.UUID
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    progress: Progress
    content: str | None = None
    reasoning_content: str | None = None
    answer: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage
    timings: Timings
    worker: str | None = None
    attempts: int
    max_batch_size: int = Field(description="The most sequences the engine ran in one step with this job")
    metadata: dict[str, str]
    webhook_url: str | None = None

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            status=job.status,
            model=job.model,
            progress=Progress(completion_tokens=job.completion_tokens, max_tokens=job.request["max_tokens"]),
            content=job.content,
            reasoning_content=job.reasoning_content,
            answer=job.answer,
            finish_reason=job.finish_reason,
            error=job.error,
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                cached_tokens=job.cached_tokens,
                completion_tokens=job.completion_tokens,
                reasoning_tokens=job.reasoning_tokens,
                total_tokens=job.total_tokens,
            ),
            timings=Timings(
                created_at=job.created_at,
                started_at=job.started_at,
                first_token_at=job.first_token_at,
                finished_at=job.finished_at,
                expires_at=job.expires_at,
            ),
            worker=job.worker,
            attempts=job.attempts,
            max_batch_size=job.max_batch_size,
            metadata=job.meta or {},
            webhook_url=job.webhook_url,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
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


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    data: list[UsageRow]
