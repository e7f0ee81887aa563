"""The Celery app of the worker processes, configured from Settings (see service/queue.py)."""

from __future__ import annotations

from celery import Celery

from service.queue import ADVANCE_BATCHES, EXPIRE_JOBS, REQUEUE_EXPIRED_LEASES, SWEEP_WEBHOOKS, celery_config
from service.settings import get_settings

# The task modules every worker imports; `ponder webhooks-worker` and `ponder beat` narrow this to
# the torch-free ones (workers/startup.py), so that they never load the engine.
TASK_MODULES = ["workers.tasks", "workers.maintenance_tasks", "workers.webhook_tasks"]

settings = get_settings()
app = Celery("ponder", include=TASK_MODULES)
app.conf.update(celery_config(settings))
app.conf.beat_schedule = {
    "requeue-expired-leases": {"task": REQUEUE_EXPIRED_LEASES, "schedule": settings.maintenance_interval_seconds},
    "expire-jobs": {"task": EXPIRE_JOBS, "schedule": 2 * settings.maintenance_interval_seconds},
    "sweep-webhooks": {"task": SWEEP_WEBHOOKS, "schedule": settings.webhook_sweep_interval_seconds},
    "advance-batches": {"task": ADVANCE_BATCHES, "schedule": settings.maintenance_interval_seconds},
}
