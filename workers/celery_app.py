"""The Celery app of the worker processes, configured from Settings (see service/queue.py)."""

from __future__ import annotations

from celery import Celery

from service.queue import EXPIRE_JOBS, REQUEUE_EXPIRED_LEASES, celery_config
from service.settings import get_settings

settings = get_settings()
app = Celery("ponder", include=["workers.tasks"])
app.conf.update(celery_config(settings))
app.conf.beat_schedule = {
    "requeue-expired-leases": {"task": REQUEUE_EXPIRED_LEASES, "schedule": settings.maintenance_interval_seconds},
    "expire-jobs": {"task": EXPIRE_JOBS, "schedule": 2 * settings.maintenance_interval_seconds},
}
