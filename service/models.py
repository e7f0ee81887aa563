"""Database tables. Alembic (migrations/) is the only way the schema changes; these classes are
what the code reads and writes. Times are timezone-aware UTC (SQLModel stores them as UTC)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

_ESC, _NUL = "\x1b", "\x00"


class NulSafeText(TypeDecorator):
    """Text that may contain NUL, which PostgreSQL's text type refuses (models do emit it).
    Stored escaped, reversibly: ESC -> ESC ESC, NUL -> ESC '0'."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        if value is None or (_NUL not in value and _ESC not in value):
            return value
        return value.replace(_ESC, _ESC + _ESC).replace(_NUL, _ESC + "0")

    def process_result_value(self, value: str | None, dialect) -> str | None:
        if value is None or _ESC not in value:
            return value
        out, i = [], 0
        while i < len(value):
            if value[i] == _ESC and i + 1 < len(value):
                out.append(_NUL if value[i + 1] == "0" else value[i + 1])
                i += 2
            else:
                out.append(value[i])
                i += 1
        return "".join(out)


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired})


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=100)
    prefix: str = Field(max_length=16)  # the first characters, to recognise a key in listings
    key_hash: str = Field(max_length=64, unique=True)  # sha256 of the key; the key itself is never stored
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    # Signs deliveries to jobs' own webhook_url (registered endpoints have their own secrets).
    # Kept as is, not hashed: signing needs it. Made on first use for keys older than webhooks.
    webhook_secret: str | None = Field(default=None, max_length=64)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_api_key_idempotency_key"),
        Index("ix_jobs_api_key_created", "api_key_id", "created_at", "id"),
        Index("ix_jobs_api_key_status_created", "api_key_id", "status", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_expires", "status", "expires_at"),
        Index("ix_jobs_api_key_finished", "api_key_id", "finished_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    api_key_id: uuid.UUID = Field(foreign_key="api_keys.id")
    status: str = Field(default=JobStatus.queued, max_length=16)
    priority: int = 0
    model: str = Field(max_length=200)
    request: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # the validated request body
    prompt_token_ids: list[int] = Field(sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    webhook_url: str | None = Field(default=None, max_length=2048)
    idempotency_key: str | None = Field(default=None, max_length=255)

    # who runs it
    worker: str | None = Field(default=None, max_length=255)
    lease_expires_at: datetime | None = None
    attempts: int = 0
    cancel_requested: bool = False
    # Resume (workers/job_runner.py): the output token ids of the attempt that wrote them last, as
    # {"model", "token_ids", "stream_id"} (stream_id: its last stream entry then); the completion
    # tokens the current attempt started from; why an attempt could not use the checkpoint.
    checkpoint: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    resumed_tokens: int = 0
    restart_reason: str | None = Field(default=None, sa_column=Column(NulSafeText))

    # results (content and reasoning are also written as progress while it runs)
    content: str | None = Field(default=None, sa_column=Column(NulSafeText))
    reasoning_content: str | None = Field(default=None, sa_column=Column(NulSafeText))
    answer: str | None = Field(default=None, sa_column=Column(NulSafeText))
    finish_reason: str | None = Field(default=None, max_length=16)
    error: str | None = Field(default=None, sa_column=Column(NulSafeText))

    # usage
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    max_batch_size: int = 0  # the most sequences the engine ran in one step while this job ran
    draft_tokens: int = 0  # speculative decoding: draft tokens the engine verified for this job
    accepted_draft_tokens: int = 0  # of those, the ones it accepted

    # timings
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime  # deadline: not finished by then, it expires
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def draft_acceptance_rate(self) -> float | None:
        """None, not 0.0: a job without drafts did not have them all rejected."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class WebhookEvent(StrEnum):
    started = "job.started"
    succeeded = "job.succeeded"
    failed = "job.failed"
    cancelled = "job.cancelled"
    expired = "job.expired"


FINAL_EVENTS = (WebhookEvent.succeeded, WebhookEvent.failed, WebhookEvent.cancelled, WebhookEvent.expired)


class DeliveryStatus(StrEnum):
    pending = "pending"  # due at next_attempt_at (or being attempted, while its lease runs)
    succeeded = "succeeded"
    failed = "failed"  # retries exhausted, 410, a refused address, or its endpoint went away


class WebhookEndpointBase(SQLModel):
    url: str = Field(max_length=2048)
    events: list[str] = Field(default_factory=lambda: [str(e) for e in FINAL_EVENTS], sa_type=JSON)
    description: str | None = Field(default=None, max_length=500)


class WebhookEndpoint(WebhookEndpointBase, table=True):
    """A URL an API key registered for its jobs' events, with its own signing secret."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_api_key", "api_key_id", "deleted_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    api_key_id: uuid.UUID = Field(foreign_key="api_keys.id")
    secret: str = Field(max_length=64)
    previous_secret: str | None = Field(default=None, max_length=64)  # still signs until it expires
    previous_secret_expires_at: datetime | None = None
    disabled_at: datetime | None = None  # set when the receiver answered 410 Gone
    disabled_reason: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None  # kept for its deliveries' history


class WebhookDelivery(SQLModel, table=True):
    """One event for one target: the message (same webhook-id and body on every attempt) and
    where its retries stand. The row, not a broker ETA, says when the next attempt is due."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_job", "job_id", "created_at"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    api_key_id: uuid.UUID = Field(foreign_key="api_keys.id")
    job_id: uuid.UUID = Field(foreign_key="jobs.id")
    endpoint_id: uuid.UUID | None = Field(default=None, foreign_key="webhook_endpoints.id")  # None: the job's URL
    event_type: str = Field(max_length=32)
    url: str = Field(max_length=2048)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # the exact body, signed anew per attempt
    status: str = Field(default=DeliveryStatus.pending, max_length=16)
    attempts: int = 0  # attempts started; the running one's number while leased
    failed_attempts: int = 0  # failures since the last (re)delivery: the position in the retry schedule
    next_attempt_at: datetime | None = None
    lease_expires_at: datetime | None = None  # an attempt in progress (a worker that dies lets it lapse)
    dispatched_at: datetime | None = None  # when a message for the due attempt went to the queue
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(NulSafeText))
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def webhook_id(self) -> str:
        return f"msg_{self.id.hex}"


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt of a delivery (or one refused before any request left)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_attempt"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    delivery_id: uuid.UUID = Field(foreign_key="webhook_deliveries.id")
    attempt: int
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None  # None while it runs, or forever if its worker died
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = Field(default=None, sa_column=Column(NulSafeText))
    response_body: str | None = Field(default=None, sa_column=Column(NulSafeText))  # the first 1 KB
