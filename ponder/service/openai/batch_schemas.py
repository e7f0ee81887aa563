"""Request and response bodies of /v1/files and /v1/batches, in OpenAI's shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ponder.service.schemas import Metadata
from ponder.service.tables import BatchStatus, FilePurpose


class FileObject(BaseModel):
    id: str = Field(description="file-<hex>")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class BatchCreate(BaseModel):
    """OpenAI's batch request. Unknown fields are refused (400 naming the field)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="A file uploaded with purpose `batch`: one request a line")
    endpoint: str = Field(max_length=64, description="/v1/chat/completions, /v1/responses or /v1/completions")
    completion_window: str = Field(description="24h: lines not done by then fail with batch_expired")
    metadata: Metadata = Field(None, max_length=16)

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value != "24h":
            raise ValueError("only 24h is supported")
        return value


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = Field(None, description="The input file's line (from 1)")


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = Field(0, description="Lines answered with a 200")
    failed: int = Field(0, description="Lines refused, failed, cancelled or expired: in the error file")


class BatchObject(BaseModel):
    id: str = Field(description="batch_<hex>")
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
