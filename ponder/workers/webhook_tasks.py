"""Celery tasks for webhooks: thin adapters (ids in; ponder/workers/webhook_sender.py re-fetches the
rows). Kept apart from ponder/workers/tasks.py so a webhooks worker never loads the engine or torch."""

from __future__ import annotations

import logging
import uuid

from ponder.service.queue import DELIVER_WEBHOOK, SWEEP_WEBHOOKS, enqueue_delivery
from ponder.service.settings import get_settings
from ponder.workers import webhook_sender
from ponder.workers.celery_app import app

logger = logging.getLogger("ponder.webhooks")


@app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> str:
    outcome = webhook_sender.deliver(uuid.UUID(delivery_id), get_settings())
    logger.info("delivery %s: %s", delivery_id, outcome)
    return outcome


@app.task(name=SWEEP_WEBHOOKS)
def sweep_webhooks() -> dict:
    return webhook_sender.sweep_due(get_settings(), enqueue_delivery)
