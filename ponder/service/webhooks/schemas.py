"""Request and response bodies of the webhook routes: endpoints, their secrets, deliveries and
their attempts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator
from sqlmodel import SQLModel

from ponder.service.job_public import RowView
from ponder.service.schemas import url_length
from ponder.service.tables import (
    FINAL_EVENTS,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointBase,
    WebhookEvent,
)


# Not a WebhookEndpointBase: it declares each of that model's fields again, with types of its own.
class WebhookEndpointCreate(SQLModel):
    """A URL to call with this key's job events, signed with a secret of its own."""

    # A dict: SQLModel types model_config as its SQLModelConfig, which it does not export.
    model_config = {"extra": "forbid"}

    url: HttpUrl = Field(description="http(s); https in production; no private addresses in production")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(FINAL_EVENTS),
        min_length=1,
        max_length=5,
        description="Default: the four final events; add job.started to hear when a worker starts a job",
    )
    description: str | None = Field(None, max_length=500)

    @field_validator("url")
    @classmethod
    def _url(cls, value: HttpUrl) -> HttpUrl:
        return url_length(value)


class WebhookEndpointPublic(WebhookEndpointBase):
    # Built from a WebhookEndpoint row: WebhookEndpointPublic.model_validate(endpoint).
    model_config = {"from_attributes": True}  # a dict: see WebhookEndpointCreate

    id: uuid.UUID
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None = None
    previous_secret_expires_at: datetime | None = Field(None, description="The rotated-out secret signs until then")
    created_at: datetime

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, value: Any) -> Any:
        if not isinstance(value, WebhookEndpoint):
            return value
        expires_at = value.previous_secret_expires_at if value.previous_secret else None  # nothing left to expire
        return RowView(
            value, status="disabled" if value.disabled_at else "enabled", previous_secret_expires_at=expires_at
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
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    started_at: datetime
    finished_at: datetime | None
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_body: str | None = Field(description="The first 1 KB of the response")


class WebhookDeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_id: str = Field(description="The webhook-id header: the same on every attempt")
    job_id: uuid.UUID
    endpoint_id: uuid.UUID | None = Field(description="None: the job's own webhook_url")
    event_type: str
    url: str
    status: DeliveryStatus
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    attempts: list[WebhookAttemptPublic]

    @classmethod
    def from_row(cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryPublic:
        """The delivery row with its attempts (rows of their own table)."""
        return cls.model_validate(RowView(delivery, attempts=attempts))


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic]
