"""/v1/webhooks: endpoints a key registers for its jobs' events, and signing secrets."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request

from ponder.api.deps import CurrentKey, SessionDep, SettingsDep
from ponder.service.webhooks import endpoints
from ponder.service.webhooks.schemas import (
    RotateSecret,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointPublic,
    WebhookEndpointWithSecret,
    WebhookSecret,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
audit = logging.getLogger("ponder.audit")  # who read a secret, and from where


@router.post("", status_code=201, response_model=WebhookEndpointWithSecret)
def create_webhook(
    body: WebhookEndpointCreate, key: CurrentKey, session: SessionDep, settings: SettingsDep
) -> WebhookEndpointWithSecret:
    """Register an endpoint; its signing secret is in this reply only."""
    endpoint = endpoints.create_endpoint(session, key, body, settings)
    return WebhookEndpointWithSecret.model_validate(endpoint)


@router.get("", response_model=WebhookEndpointList)
def list_webhooks(key: CurrentKey, session: SessionDep) -> WebhookEndpointList:
    """The caller's endpoints (without secrets)."""
    rows = endpoints.list_endpoints(session, key)
    return WebhookEndpointList(data=[WebhookEndpointPublic.model_validate(e) for e in rows])


@router.get("/default-secret", response_model=WebhookSecret)
def default_secret(key: CurrentKey, session: SessionDep, request: Request) -> WebhookSecret:
    """The secret that signs deliveries to jobs' own `webhook_url`."""
    client = request.client.host if request.client else "?"
    audit.info("api key %s (%s) read its default webhook signing secret from %s", key.prefix, key.id, client)
    return WebhookSecret(secret=endpoints.default_secret(session, key.id))


@router.get("/{webhook_id}", response_model=WebhookEndpointPublic)
def get_webhook(webhook_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookEndpointPublic:
    """One endpoint (without its secret)."""
    return WebhookEndpointPublic.model_validate(endpoints.get_endpoint(session, key, webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookEndpointDeleted)
def delete_webhook(webhook_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookEndpointDeleted:
    """Stop sending to an endpoint; its pending deliveries stop too."""
    return WebhookEndpointDeleted(id=endpoints.delete_endpoint(session, key, webhook_id).id)


@router.post("/{webhook_id}/enable", response_model=WebhookEndpointPublic)
def enable_webhook(webhook_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookEndpointPublic:
    """Deliver to a disabled endpoint again (events from now on; redeliver what failed)."""
    return WebhookEndpointPublic.model_validate(endpoints.enable_endpoint(session, key, webhook_id))


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(
    webhook_id: uuid.UUID,
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    body: RotateSecret | None = None,
) -> WebhookEndpointWithSecret:
    """A new secret (in this reply only); the old one also signs until `grace_seconds` pass."""
    grace = body.grace_seconds if body else None
    endpoint = endpoints.rotate_secret(session, key, webhook_id, grace, settings)
    return WebhookEndpointWithSecret.model_validate(endpoint)
