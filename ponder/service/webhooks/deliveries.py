"""Webhook deliveries: created in the same transaction that moves a job to a new state (an outbox:
an event exists exactly when its state change was committed), sent after that commit, and
listed and redelivered through the REST API. The rows are the truth; queue messages only say
"look at this delivery now" (see ponder/workers/webhook_sender.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import update
from sqlmodel import Session, col, select

from ponder.service.errors import Conflict, NotFound
from ponder.service.settings import Settings
from ponder.service.tables import (
    ApiKey,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)
from ponder.service.webhooks.signing import event_payload


class Target(NamedTuple):
    """Where an event goes: a URL, and its endpoint (None for the job's own webhook_url)."""

    url: str
    endpoint_id: uuid.UUID | None
    # Set when its receiver or its key had no attempt slot free as the event was recorded: the
    # delivery is due then and the sweep sends it; no message is sent now, only to be postponed.
    held_until: datetime | None = None


Targets = list[Target]

EVENT_OF_STATUS = {
    JobStatus.succeeded: WebhookEvent.succeeded,
    JobStatus.failed: WebhookEvent.failed,
    JobStatus.cancelled: WebhookEvent.cancelled,
    JobStatus.expired: WebhookEvent.expired,
}


def record_job_event(
    session: Session, job: Job, event: WebhookEvent, settings: Settings, targets: Targets | None = None
) -> list[uuid.UUID]:
    """Add one delivery per target of `event` to the caller's transaction; returns the ids of those
    not held back, for the caller to enqueue after its commit. `targets`: looked up beforehand by
    the caller (see event_targets), else here."""
    if targets is None:
        targets = event_targets(session, job.api_key_id, job.webhook_url, event)
    return _add_deliveries(session, job, event, targets, settings) if targets else []


def record_final_event(
    session: Session, job_id: uuid.UUID, settings: Settings, targets: Targets | None = None
) -> list[uuid.UUID]:
    """The event of a job that has just reached its final state in this transaction (the row is
    read in full only when someone listens: a long job's text is large)."""
    if targets == []:  # the caller knows nobody listens: not a statement more inside its write
        return []
    api_key_id, webhook_url, status = session.exec(
        select(Job.api_key_id, Job.webhook_url, Job.status).where(col(Job.id) == job_id)
    ).one()
    event = EVENT_OF_STATUS.get(JobStatus(status))
    if targets is None:
        targets = event_targets(session, api_key_id, webhook_url, event) if event else []
    if not targets:
        return []
    assert event is not None  # no event: no targets found above, and callers pass theirs only for a final event
    job = session.exec(select(Job).where(col(Job.id) == job_id).execution_options(populate_existing=True)).one()
    return _add_deliveries(session, job, event, targets, settings)


def event_targets(session: Session, api_key_id: uuid.UUID, webhook_url: str | None, event: WebhookEvent) -> Targets:
    """The job's own webhook_url (final events only), then each live endpoint of its key that
    subscribed to the event. Writers on SQLite look these up before their first write: the
    database-wide write lock is then held only from the UPDATE to the commit."""
    targets: Targets = []
    if webhook_url and event != WebhookEvent.started:
        targets.append(Target(webhook_url, None))
    endpoints = session.exec(
        select(WebhookEndpoint).where(
            WebhookEndpoint.api_key_id == api_key_id,
            col(WebhookEndpoint.deleted_at).is_(None),
            col(WebhookEndpoint.disabled_at).is_(None),
        )
    ).all()
    return targets + [Target(endpoint.url, endpoint.id) for endpoint in endpoints if str(event) in endpoint.events]


def _add_deliveries(
    session: Session, job: Job, event: WebhookEvent, targets: Targets, settings: Settings
) -> list[uuid.UUID]:
    now = utcnow()
    payload = event_payload(job, str(event), settings.base_url, now.isoformat().replace("+00:00", "Z"))
    deliveries = [
        WebhookDelivery(
            api_key_id=job.api_key_id,
            job_id=job.id,
            endpoint_id=endpoint_id,
            event_type=str(event),
            url=url,
            payload=payload,
            next_attempt_at=held_until or now,
            dispatched_at=None if held_until else now,  # the caller sends the first message right after its commit
            created_at=now,
            updated_at=now,
        )
        for url, endpoint_id, held_until in targets
    ]
    session.add_all(deliveries)
    return [delivery.id for delivery, target in zip(deliveries, targets, strict=True) if not target.held_until]


# -- the REST API's side ----------------------------------------------------------------------------


def list_job_deliveries(session: Session, job: Job) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    deliveries = session.exec(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(col(WebhookDelivery.created_at), col(WebhookDelivery.id))
    ).all()
    return [(delivery, delivery_attempts(session, delivery.id)) for delivery in deliveries]


def delivery_attempts(session: Session, delivery_id: uuid.UUID) -> list[WebhookAttempt]:
    statement = select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
    return list(session.exec(statement.order_by(col(WebhookAttempt.attempt))).all())


def get_delivery(session: Session, key: ApiKey, delivery_id: uuid.UUID) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.api_key_id != key.id:  # another key's delivery does not exist for this caller
        raise NotFound(f"no delivery {delivery_id}", "delivery_id")
    return delivery


def redeliver(session: Session, key: ApiKey, delivery_id: uuid.UUID, enqueue) -> WebhookDelivery:
    """Send the same message (same webhook-id and body, fresh signature) again now, with a fresh
    retry schedule. An attempt already in flight is not doubled: the next one waits for its lease."""
    delivery = get_delivery(session, key, delivery_id)
    if delivery.endpoint_id is not None:
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        assert endpoint is not None  # a foreign key, and endpoint rows are never deleted (deleted_at)
        if endpoint.deleted_at is not None:
            raise Conflict("the delivery's webhook endpoint was deleted", "delivery_id")
        if endpoint.disabled_at is not None:
            raise Conflict(f"the delivery's webhook endpoint is disabled ({endpoint.disabled_reason})")
    now = utcnow()
    session.exec(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id) == delivery.id)
        .values(
            status=DeliveryStatus.pending,
            failed_attempts=0,
            next_attempt_at=now,
            dispatched_at=now,
            finished_at=None,
            updated_at=now,
        )
    )
    session.commit()
    session.refresh(delivery)
    enqueue(str(delivery.id))
    return delivery
