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

from ponder.service.encryption import EncryptedText

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
    webhook_secret: str | None = Field(default=None, sa_column=Column(EncryptedText, nullable=True))  # at rest: Fernet
    # Rate limits and quotas (ponder/service/rate_limits.py); None: the deployment's default
    # (PONDER_RATE_LIMIT_*), 0: unlimited.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent_jobs: int | None = None
    # Fair share (ponder/workers/job_picker.py): a key's running jobs count divided by this when a free
    # slot picks whose queued job runs next.
    weight: float = Field(default=1.0, gt=0, sa_column_kwargs={"server_default": "1"})


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_api_key_idempotency_key"),
        Index("ix_jobs_api_key_created", "api_key_id", "created_at", "id"),
        Index("ix_jobs_api_key_status_created", "api_key_id", "status", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_expires", "status", "expires_at"),
        Index("ix_jobs_status_batch_key", "status", "batch_id", "api_key_id", "created_at"),  # the fair pick
        Index("ix_jobs_status_batch_line", "status", "batch_id", "batch_line"),  # a batch's next line
        Index("ix_jobs_api_key_finished", "api_key_id", "finished_at"),
        # a batch's lines: each line once (a validation run again resumes after the last one stored)
        UniqueConstraint("batch_id", "batch_line", name="uq_jobs_batch_line"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
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
    # A job made by POST /v1/responses (ponder/service/openai/responses.py): what its response object shows
    # that the job keeps nowhere else, {"background", "reasoning"}. None: the job is not a response.
    openai_response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # A job made by POST /v1/completions (ponder/service/openai/completions.py): {"echo", "scored_only"},
    # what its answer shows that the request does not say. None: the job is not a legacy completion.
    openai_completion: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    # A line of a batch (ponder/service/openai/batches.py): its batch, its line number in the input file
    # (from 1) and its custom_id. Batch jobs are queued behind every other job (ponder/service/queue.py).
    batch_id: str | None = Field(default=None, foreign_key="batches.id", max_length=64)
    batch_line: int | None = None
    batch_custom_id: str | None = Field(default=None, max_length=512)

    # who runs it
    worker: str | None = Field(default=None, max_length=255)
    lease_expires_at: datetime | None = None
    attempts: int = 0  # claims so far: the fencing token of the running one (ponder/workers/job_runner.py Claim)
    # Attempts that ended with their worker gone (no heartbeat): what max_attempts limits. A drain,
    # or a lease lost while the worker lived on (a pause, an outage), is not the job's fault.
    faults: int = 0
    cancel_requested: bool = False
    # Resume (ponder/workers/job_runner.py): the output token ids of the attempt that wrote them last, as
    # {"model", "token_ids", "stream_id", "logprobs"} (stream_id: its last stream entry then;
    # logprobs: the tokens' values, packed, when the job keeps them); the completion
    # tokens the current attempt started from; why an attempt could not use the checkpoint.
    checkpoint: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    resumed_tokens: int = 0
    wasted_tokens: int = 0  # generated by earlier attempts past their checkpoints, then thrown away
    restart_reason: str | None = Field(default=None, sa_column=Column(NulSafeText))

    # results (content and reasoning are also written as progress while it runs)
    content: str | None = Field(default=None, sa_column=Column(NulSafeText))
    reasoning_content: str | None = Field(default=None, sa_column=Column(NulSafeText))
    answer: str | None = Field(default=None, sa_column=Column(NulSafeText))
    # n > 1: each sample's result (job_public.SamplePublic's fields); the columns above are sample 0's
    samples: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # n > 1: the vote over the samples' answers (ponder/workers/vote.py: job_public.VotePublic's fields), whether
    # it stopped the samples still running, and the max_tokens budget those had left then
    vote: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    stopped_early: bool = False
    # With `logprobs` asked: each sample's output tokens' log probabilities, packed
    # (ponder/service/logprobs.py), by sample index; a running job's are in its checkpoint
    logprobs: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    prompt_logprobs: str | None = Field(default=None, sa_column=Column(Text))  # prompt tokens 2.. (the first has none)
    early_stop_unspent_tokens: int = 0
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


class FilePurpose(StrEnum):
    batch = "batch"  # uploaded: a batch's input
    batch_output = "batch_output"  # written by Ponder: a batch's output or error file


class StoredFile(SQLModel, table=True):
    """A file of /v1/files; its bytes are at `Settings.files_dir / id` (ponder/service/openai/files.py)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_api_key_created", "api_key_id", "created_at", "id"),)

    id: str = Field(primary_key=True, max_length=64)  # file-<hex>
    api_key_id: uuid.UUID = Field(foreign_key="api_keys.id")
    purpose: str = Field(max_length=32)
    filename: str = Field(max_length=255)
    bytes: int
    status: str = Field(default="processed", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)


class BatchStatus(StrEnum):
    validating = "validating"
    failed = "failed"  # the input file is invalid as a whole: no job was made
    in_progress = "in_progress"
    finalizing = "finalizing"  # every line is done; the output and error files are being written
    completed = "completed"
    expired = "expired"  # not done within its completion window: lines not done failed with batch_expired
    cancelling = "cancelling"
    cancelled = "cancelled"


class Batch(SQLModel, table=True):
    """A batch of /v1/batches: each line of its input file is a job (Job.batch_id), or a
    BatchLineError when its body is refused. Its request counts are counted from those rows."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_api_key_created", "api_key_id", "created_at", "id"),
        Index("ix_batches_status", "status"),
    )

    id: str = Field(primary_key=True, max_length=64)  # batch_<hex>
    api_key_id: uuid.UUID = Field(foreign_key="api_keys.id")
    endpoint: str = Field(max_length=64)
    input_file_id: str = Field(max_length=64)  # no foreign key: OpenAI lets a batch's input be deleted
    completion_window: str = Field(max_length=16)
    status: str = Field(default=BatchStatus.validating, max_length=16)
    meta: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON, nullable=True))
    errors: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    output_file_id: str | None = Field(default=None, max_length=64)
    error_file_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    in_progress_at: datetime | None = None
    expires_at: datetime  # the end of its completion window; its jobs' deadline too
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)  # beat re-sends a validation left this long


class BatchLineError(SQLModel, table=True):
    """A batch line whose body was refused (as the chat route would have refused it, with no job):
    it fails alone, with this error body, in the batch's error file."""

    __tablename__ = "batch_line_errors"

    batch_id: str = Field(foreign_key="batches.id", primary_key=True, max_length=64)
    line: int = Field(primary_key=True)
    custom_id: str = Field(max_length=512)
    status_code: int
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


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
    # at rest: Fernet tokens (ponder/service/encryption.py); the previous secret signs until it expires
    secret: str = Field(sa_column=Column(EncryptedText, nullable=False))
    previous_secret: str | None = Field(default=None, sa_column=Column(EncryptedText, nullable=True))
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
