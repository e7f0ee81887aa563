"""Celery tasks of the maintenance queue (beat's process): thin adapters over ponder/workers/maintenance.py
(a batch's own tasks run elsewhere: ponder/workers/batch_tasks.py). Kept apart from
ponder/workers/tasks.py so `ponder beat` never loads the engine or torch (it runs in the slim image,
docker/api.Dockerfile). Each waits out a database that is away (a restart) and runs again whole:
every one of them is idempotent."""

from __future__ import annotations

from functools import partial

from ponder.service.queue import EXPIRE_JOBS, PURGE_OLD_JOBS, REQUEUE_EXPIRED_LEASES
from ponder.service.settings import get_settings
from ponder.service.streams import JobSignals
from ponder.workers import batches, maintenance
from ponder.workers.celery_app import app
from ponder.workers.outages import patiently
from ponder.workers.stray_files import sweep_stray_files


@app.task(name=REQUEUE_EXPIRED_LEASES)
def requeue_expired_leases() -> dict:
    settings, signals = get_settings(), JobSignals(get_settings().redis_url)
    end_streams = partial(signals.expire_streams, seconds=settings.stream_ttl_seconds)
    run = partial(maintenance.requeue_expired_leases, settings, signals.worker_alive, end_streams)
    return patiently(run, settings, "requeueing expired leases")


@app.task(name=EXPIRE_JOBS)
def expire_jobs() -> dict:
    settings, signals = get_settings(), JobSignals(get_settings().redis_url)
    end_streams = partial(signals.expire_streams, seconds=settings.stream_ttl_seconds)
    run = partial(maintenance.expire_jobs, signals.publish_cancel, settings, end_streams)
    return patiently(run, settings, "expiring jobs")


@app.task(name=PURGE_OLD_JOBS)
def purge_old_jobs() -> dict:
    settings = get_settings()

    def purge() -> dict:
        deleted_jobs = maintenance.purge_old_jobs(settings, JobSignals(settings.redis_url).delete_streams)
        return deleted_jobs | batches.purge_old_files(settings) | sweep_stray_files(settings)

    return patiently(purge, settings, "purging old jobs and files")
