"""Celery tasks of the batches queue (`ponder batches-worker`): thin adapters over ponder/workers/batches.py.
A batch's validation tokenizes every line and its finalization writes its files: minutes each, in
a process of their own, so that beat's maintenance never waits behind them. Torch-free, like beat.
Each waits out a database that is away and runs again whole: both are idempotent."""

from __future__ import annotations

from functools import partial

from ponder.service.queue import ADVANCE_BATCHES, VALIDATE_BATCH
from ponder.service.settings import get_settings
from ponder.service.streams import JobSignals
from ponder.workers import batches
from ponder.workers.celery_app import app
from ponder.workers.outages import patiently


@app.task(name=VALIDATE_BATCH)
def validate_batch(batch_id: str) -> str:
    settings = get_settings()
    return patiently(partial(batches.validate_batch, batch_id, settings), settings, "validating a batch")


@app.task(name=ADVANCE_BATCHES)
def advance_batches(batch_id: str | None = None) -> dict:
    settings = get_settings()
    run = partial(batches.advance_batches, settings, JobSignals(settings.redis_url).publish_cancel, batch_id)
    return patiently(run, settings, "advancing batches")
