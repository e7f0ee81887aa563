"""Webhook deliveries: a job's deliveries with every attempt, and redelivery."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from ponder.api.deps import CurrentKey, SessionDep, rate_limited
from ponder.service import job_rules
from ponder.service.queue import publisher
from ponder.service.webhooks import deliveries
from ponder.service.webhooks.schemas import WebhookDeliveryList, WebhookDeliveryPublic

router = APIRouter(prefix="/v1", tags=["deliveries"])


@router.get("/jobs/{job_id}/deliveries", response_model=WebhookDeliveryList)
def job_deliveries(job_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookDeliveryList:
    """A job's webhook deliveries, oldest first, each with all its attempts."""
    job = job_rules.get_job(session, key, job_id)
    rows = deliveries.list_job_deliveries(session, job)
    return WebhookDeliveryList(data=[WebhookDeliveryPublic.from_row(d, attempts) for d, attempts in rows])


@router.get("/deliveries/{delivery_id}", response_model=WebhookDeliveryPublic)
def get_delivery(delivery_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookDeliveryPublic:
    """One delivery with all its attempts."""
    delivery = deliveries.get_delivery(session, key, delivery_id)
    return WebhookDeliveryPublic.from_row(delivery, deliveries.delivery_attempts(session, delivery.id))


# A redelivery makes work (an attempt to the receiver): it counts against the key's requests per minute.
@router.post(
    "/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDeliveryPublic,
    dependencies=[Depends(rate_limited)],
)
def redeliver(delivery_id: uuid.UUID, key: CurrentKey, session: SessionDep) -> WebhookDeliveryPublic:
    """Send the same event (same webhook-id) again now, with a fresh retry schedule."""
    delivery = deliveries.redeliver(session, key, delivery_id, publisher.submit_delivery)
    return WebhookDeliveryPublic.from_row(delivery, deliveries.delivery_attempts(session, delivery.id))
