"""Registered webhook endpoints and signing secrets, behind /v1/webhooks. Route handlers stay
thin; these functions hold the rules."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from ponder.service.errors import Conflict, NotFound, Unprocessable
from ponder.service.security import one_at_a_time
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, WebhookEndpoint, utcnow
from ponder.service.webhooks.schemas import WebhookEndpointCreate
from ponder.service.webhooks.signing import generate_secret
from ponder.service.webhooks.url_safety import UnsafeWebhookUrl, check_url

MAX_ENDPOINTS_PER_KEY = 16


def check_webhook_url(url: str, settings: Settings, param: str) -> None:
    """422 for a URL deliveries would refuse anyway (scheme, private address, unresolvable host)."""
    assert settings.webhook_allow_private is not None  # Settings._webhook_defaults fills it in
    try:
        check_url(url, settings.webhook_allow_private, settings.webhook_require_https)
    except UnsafeWebhookUrl as e:
        raise Unprocessable(f"{param}: {e}", param) from None


def create_endpoint(session: Session, key: ApiKey, body: WebhookEndpointCreate, settings: Settings) -> WebhookEndpoint:
    url = str(body.url)
    check_webhook_url(url, settings, "url")
    one_at_a_time(session, key.id)  # the count below sees every endpoint committed before
    if len(list_endpoints(session, key)) >= MAX_ENDPOINTS_PER_KEY:
        session.rollback()
        raise Conflict(f"at most {MAX_ENDPOINTS_PER_KEY} webhook endpoints per API key; delete one first")
    endpoint = WebhookEndpoint(
        api_key_id=key.id,
        url=url,
        events=list(dict.fromkeys(str(e) for e in body.events)),
        description=body.description,
        secret=generate_secret(),
    )
    session.add(endpoint)
    session.commit()
    return endpoint


def list_endpoints(session: Session, key: ApiKey) -> list[WebhookEndpoint]:
    statement = select(WebhookEndpoint).where(
        WebhookEndpoint.api_key_id == key.id, col(WebhookEndpoint.deleted_at).is_(None)
    )
    return list(session.exec(statement.order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))).all())


def get_endpoint(session: Session, key: ApiKey, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    # another key's endpoint, or a deleted one, does not exist for this caller
    if endpoint is None or endpoint.api_key_id != key.id or endpoint.deleted_at is not None:
        raise NotFound(f"no webhook endpoint {endpoint_id}", "webhook_id")
    return endpoint


def delete_endpoint(session: Session, key: ApiKey, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """Kept as a row for its deliveries' history; pending deliveries to it stop at their next attempt."""
    endpoint = get_endpoint(session, key, endpoint_id)
    endpoint.deleted_at = utcnow()
    session.add(endpoint)
    session.commit()
    return endpoint


def enable_endpoint(session: Session, key: ApiKey, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """Deliver to an endpoint again after a 410 disabled it: events from now on. Those that came
    while it was disabled made no delivery; its failed deliveries can be redelivered now."""
    endpoint = get_endpoint(session, key, endpoint_id)
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    session.add(endpoint)
    session.commit()
    return endpoint


def rotate_secret(
    session: Session, key: ApiKey, endpoint_id: uuid.UUID, grace_seconds: int | None, settings: Settings
) -> WebhookEndpoint:
    """A new secret signs from now on; the old one signs too until the grace period ends, so
    receivers can switch over without rejecting a message."""
    endpoint = get_endpoint(session, key, endpoint_id)
    grace = settings.webhook_secret_grace_seconds if grace_seconds is None else grace_seconds
    now = utcnow()
    endpoint.previous_secret, endpoint.secret = endpoint.secret, generate_secret()
    endpoint.previous_secret_expires_at = now + timedelta(seconds=grace) if grace > 0 else None
    if grace <= 0:
        endpoint.previous_secret = None
    session.add(endpoint)
    session.commit()
    return endpoint


def signing_secrets(endpoint: WebhookEndpoint) -> list[str]:
    """The current secret, then the previous one while its grace period runs."""
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and expires > utcnow():
        return [endpoint.secret, endpoint.previous_secret]
    return [endpoint.secret]


def default_secret(session: Session, key_id: uuid.UUID) -> str:
    """The key's secret for jobs' own webhook_url, made on first use (keys created before webhooks
    have none). A conditional UPDATE: two first uses at once agree on one secret."""
    secret = session.exec(select(ApiKey.webhook_secret).where(col(ApiKey.id) == key_id)).one()
    if secret is None:
        session.exec(
            update(ApiKey)
            .where(col(ApiKey.id) == key_id, col(ApiKey.webhook_secret).is_(None))
            .values(webhook_secret=generate_secret())
        )
        session.commit()
        secret = session.exec(select(ApiKey.webhook_secret).where(col(ApiKey.id) == key_id)).one()
        assert secret is not None  # set by the UPDATE above, or by the first use that won the race
    return secret


def reencrypt_secrets(session: Session) -> int:
    """Every stored signing secret written again, so under PONDER_SECRET_KEY (after a rotation they
    were read through PONDER_PREVIOUS_SECRET_KEYS: ponder/service/encryption.py); returns the rows rewritten."""
    keys = session.exec(select(ApiKey.id, ApiKey.webhook_secret).where(col(ApiKey.webhook_secret).is_not(None))).all()
    for key_id, secret in keys:
        session.exec(update(ApiKey).where(col(ApiKey.id) == key_id).values(webhook_secret=secret))
    endpoints = session.exec(select(WebhookEndpoint)).all()
    for endpoint in endpoints:
        session.exec(
            update(WebhookEndpoint)
            .where(col(WebhookEndpoint.id) == endpoint.id)
            .values(secret=endpoint.secret, previous_secret=endpoint.previous_secret)
        )
    session.commit()
    return len(keys) + len(endpoints)
