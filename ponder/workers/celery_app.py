"""The Celery app of the worker processes, configured from Settings (see ponder/service/queue.py)."""

from __future__ import annotations

from celery import Celery, bootsteps

from ponder.service.queue import (
    ADVANCE_BATCHES,
    EXPIRE_JOBS,
    PURGE_OLD_JOBS,
    REQUEUE_EXPIRED_LEASES,
    SWEEP_WEBHOOKS,
    celery_config,
)
from ponder.service.settings import get_settings

# The task modules every worker imports; `ponder webhooks-worker`, `ponder batches-worker` and
# `ponder beat` narrow this to the torch-free ones (ponder/workers/startup.py): they never load the engine.
PURGE_INTERVAL_SECONDS = 3600.0  # retention is in days: an hourly sweep is soon enough

TASK_MODULES = [
    "ponder.workers.tasks",
    "ponder.workers.maintenance_tasks",
    "ponder.workers.webhook_tasks",
    "ponder.workers.batch_tasks",
]


class UnbufferedTaskEvents(bootsteps.StartStopStep):
    """Task events published one by one, under the dispatcher's lock. Celery buffers them when the
    worker runs an event loop, but the buffer is appended to from pool threads and cleared by the
    loop without a lock (celery/celery#10434): a thread's task-started or task-succeeded that lands
    between a flush's publish and its clear is lost, and Flower shows the job RECEIVED for ever.
    Runs on every consumer start (a reconnect makes a new dispatcher)."""

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c) -> None:
        if c.event_dispatcher is not None:
            c.event_dispatcher.flush()  # anything buffered before this start
            c.event_dispatcher.buffer_group = frozenset()


settings = get_settings()
app = Celery("ponder", include=TASK_MODULES)
app.steps["consumer"].add(UnbufferedTaskEvents)
app.conf.update(celery_config(settings))
app.conf.beat_schedule = {
    "requeue-expired-leases": {"task": REQUEUE_EXPIRED_LEASES, "schedule": settings.maintenance_interval_seconds},
    "expire-jobs": {"task": EXPIRE_JOBS, "schedule": 2 * settings.maintenance_interval_seconds},
    "sweep-webhooks": {"task": SWEEP_WEBHOOKS, "schedule": settings.webhook_sweep_interval_seconds},
    # sent by beat, run by the batches worker (its own queue)
    "advance-batches": {"task": ADVANCE_BATCHES, "schedule": settings.maintenance_interval_seconds},
    # retention (PONDER_RETENTION_DAYS): a day's worth of finished jobs is erased within this long
    "purge-old-jobs": {"task": PURGE_OLD_JOBS, "schedule": PURGE_INTERVAL_SECONDS},
}
