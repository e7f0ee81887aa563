"""Request and response bodies of the REST API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from service.models import (
    FINAL_EVENTS,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointBase,
)
from service.webhooks import MAX_URL_LENGTH


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
        return _url_length(value)

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


def _url_length(value: HttpUrl | None) -> HttpUrl | None:
    if value is not None and len(str(value)) > MAX_URL_LENGTH:
        raise ValueError(f"longer than {MAX_URL_LENGTH} characters")
    return value


# -- webhooks -------------------------------------------------------------------------------------

EventType = Literal["job.started", "job.succeeded", "job.failed", "job.cancelled", "job.expired"]


class WebhookEndpointCreate(WebhookEndpointBase):
    """A URL to call with this key's job events, signed with a secret of its own."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http(s); https in production; no private addresses in production")
    events: list[EventType] = Field(
        default_factory=lambda: [str(e) for e in FINAL_EVENTS],
        min_length=1,
        max_length=5,
        description="Default: the four final events; add job.started to hear when a worker starts a job",
    )
    description: str | None = Field(None, max_length=500)

    @field_validator("url")
    @classmethod
    def _url(cls, value: HttpUrl) -> HttpUrl:
        return _url_length(value)


class WebhookEndpointPublic(WebhookEndpointBase):
    id: uuid.UUID
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None = None
    previous_secret_expires_at: datetime | None = Field(None, description="The rotated-out secret signs until then")
    created_at: datetime

    @classmethod
    def from_row(cls, endpoint: WebhookEndpoint, **extra: Any) -> WebhookEndpointPublic:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            description=endpoint.description,
            status="disabled" if endpoint.disabled_at else "enabled",
            disabled_reason=endpoint.disabled_reason,
            previous_secret_expires_at=endpoint.previous_secret_expires_at if endpoint.previous_secret else None,
            created_at=endpoint.created_at,
            **extra,
        )


class WebhookEndpointWithSecret(WebhookEndpointPublic):
    secret: str = Field(description="whsec_...: shown only now; verify deliveries with it")


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]


class WebhookEndpointDeleted(BaseModel):
    id: uuid.UUID
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: int | None = Field(
        None, ge=0, le=7 * 24 * 3600, description="How long the old secret keeps signing (default 24 h)"
    )


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(description="Signs deliveries to jobs' own webhook_url")


class WebhookAttemptPublic(BaseModel):
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_body: str | None = Field(description="The first 1 KB of the response")

    @classmethod
    def from_row(cls, attempt: WebhookAttempt) -> WebhookAttemptPublic:
        return cls.model_validate(attempt, from_attributes=True)


class WebhookDeliveryPublic(BaseModel):
    id: uuid.UUID
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt")
    job_id: uuid.UUID
    endpoint_id: uuid.UUID | None = Field(description="None: the job's own webhook_url")
    event_type: str
    url: str
    status: Literal["pending", "succeeded", "failed"]
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    attempts: list[WebhookAttemptPublic]

    @classmethod
    def from_row(cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryPublic:
        return cls(
            id=delivery.id,
            webhook_id=delivery.webhook_id,
            job_id=delivery.job_id,
            endpoint_id=delivery.endpoint_id,
            event_type=delivery.event_type,
            url=delivery.url,
            status=delivery.status,
            next_attempt_at=delivery.next_attempt_at,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            finished_at=delivery.finished_at,
            attempts=[WebhookAttemptPublic.from_row(a) for a in attempts],
        )


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic]
