"""Celery tasks of the maintenance queue (beat's process): thin adapters over ponder/workers/maintenance.py and
ponder/workers/batches.py. Kept apart from ponder/workers/tasks.py so `ponder beat` never loads the engine or torch (it
runs in the slim image, docker/api.Dockerfile)."""

from __future__ import annotations

from ponder.service.queue import ADVANCE_BATCHES, EXPIRE_JOBS, PURGE_OLD_JOBS, REQUEUE_EXPIRED_LEASES, VALIDATE_BATCH
from ponder.service.settings import get_settings
from ponder.service.streams import JobSignals
from ponder.workers import batches, maintenance
from ponder.workers.celery_app import app


@app.task(name=REQUEUE_EXPIRED_LEASES)
def requeue_expired_leases() -> dict:
    settings = get_settings()
    return maintenance.requeue_expired_leases(settings, JobSignals(settings.redis_url).worker_alive)


@app.task(name=EXPIRE_JOBS)
def expire_jobs() -> dict:
    settings = get_settings()
    return maintenance.expire_jobs(JobSignals(settings.redis_url).publish_cancel, settings)


@app.task(name=VALIDATE_BATCH)
def validate_batch(batch_id: str) -> str:
    return batches.validate_batch(batch_id, get_settings())


@app.task(name=ADVANCE_BATCHES)
def advance_batches(batch_id: str | None = None) -> dict:
    settings = get_settings()
    return batches.advance_batches(settings, JobSignals(settings.redis_url).publish_cancel, batch_id)


@app.task(name=PURGE_OLD_JOBS)
def purge_old_jobs() -> dict:
    settings = get_settings()
    deleted_jobs = maintenance.purge_old_jobs(settings, JobSignals(settings.redis_url).delete_streams)
    return deleted_jobs | batches.purge_old_files(settings)
