"""Celery tasks of the inference queue: thin adapters. They take ids, and the functions they call
re-fetch the rows. The maintenance tasks are in ponder/workers/maintenance_tasks.py, the webhook tasks in
ponder/workers/webhook_tasks.py: neither loads the engine."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from functools import lru_cache

import redis as redis_lib
from celery.signals import worker_shutting_down

from ponder.service.queue import RUN_JOB
from ponder.service.settings import get_settings
from ponder.service.streams import CANCEL_CHANNEL, WORKER_KEY_PREFIX
from ponder.workers import job_runner
from ponder.workers.celery_app import app
from ponder.workers.engine_host import EngineHost
from ponder.workers.kv_reservations import KvReservations

logger = logging.getLogger("ponder.worker")

_host: EngineHost | None = None
_host_lock = threading.Lock()
_worker_name = f"inference@{socket.gethostname()}:{os.getpid()}"


# Set when the worker is told to stop (SIGTERM, or SIGINT as `ponder up` sends it): job threads
# checkpoint and release their jobs at once instead of running them to the end.
draining = threading.Event()


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    """`job_id`: the job the message was sent for; the slot may run another (the fair pick)."""
    host, settings = engine_host(), get_settings()
    outcome = job_runner.run_job(uuid.UUID(job_id), host, settings, _worker_name, _redis(), draining, kv_reservations())
    logger.info("message for job %s: %s", job_id, outcome)
    return outcome


@worker_shutting_down.connect
def _drain(**_) -> None:
    """A warm shutdown: release every job in flight now (each to be resumed elsewhere from its
    checkpoint) and exit within drain_seconds even if a job thread is stuck."""
    draining.set()
    seconds = get_settings().drain_seconds
    logger.warning("draining: releasing jobs in flight; exiting within %.0f s", seconds)
    timer = threading.Timer(seconds, lambda: os._exit(1))
    timer.daemon = True
    timer.start()


def worker_name() -> str:
    """This process as jobs' `worker` field names it."""
    return _worker_name


def engine_host() -> EngineHost:
    """The process-wide engine host, built once (the model loads here; `ponder worker` builds it
    before taking tasks)."""
    global _host
    with _host_lock:
        if _host is None:
            settings = get_settings()
            _host = EngineHost(
                settings.model,
                settings.engine,
                heartbeat=_heartbeat,
                heartbeat_seconds=settings.worker_heartbeat_seconds,
            )
            _listen_for_cancels(_host)
        return _host


@lru_cache(maxsize=1)
def kv_reservations() -> KvReservations:
    """What this worker's engine has promised to hold (ponder/workers/kv_reservations.py)."""
    settings, blocks = get_settings(), engine_host().engine.scheduler.block_manager
    return KvReservations(
        blocks.num_blocks,
        blocks.block_size,
        settings.engine.max_num_seqs,
        settings.admission_output_share,
        settings.batch_engine_share,
    )


@lru_cache(maxsize=1)
def _redis():
    return redis_lib.Redis.from_url(get_settings().redis_url, decode_responses=True)


def _heartbeat() -> None:
    status = {**_host.status(), **kv_reservations().status()} if _host else {}
    ttl = max(15, int(3 * get_settings().worker_heartbeat_seconds))
    _redis().set(WORKER_KEY_PREFIX + _worker_name, json.dumps(status), ex=ttl)


def _listen_for_cancels(host: EngineHost) -> None:
    def listen() -> None:
        while True:
            try:
                pubsub = redis_lib.Redis.from_url(get_settings().redis_url, decode_responses=True).pubsub(
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(CANCEL_CHANNEL)
                for message in pubsub.listen():
                    host.abort_job(message["data"])  # unknown ids are ignored by the host
            except Exception:  # reconnect: cancellations also arrive through the database flag
                logger.exception("cancel listener lost its connection")
                threading.Event().wait(1.0)

    threading.Thread(target=listen, name="cancel-listener", daemon=True).start()
