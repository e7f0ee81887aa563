"""The Celery configuration shared by the API (which only sends, by task name) and the workers.

Explicit queues; tasks carry job ids only; late acks with redelivery on a lost worker; a Redis
visibility timeout above the longest job; task events for Flower.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from functools import lru_cache

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError
from redis.exceptions import RedisError

from ponder.service.rate_limits import sync_redis
from ponder.service.settings import Settings, get_settings

logger = logging.getLogger("ponder.queue")

INFERENCE_QUEUE, WEBHOOKS_QUEUE, MAINTENANCE_QUEUE = "inference", "webhooks", "maintenance"
# A batch's validation (tokenizing up to 50,000 lines) and its finalization (writing its files) take
# minutes: a queue and a process of their own (`ponder batches-worker`), so that beat's maintenance
# (re-queueing, expiry, webhook sweeps) never waits behind them.
BATCHES_QUEUE = "batches"
QUEUES = (INFERENCE_QUEUE, WEBHOOKS_QUEUE, MAINTENANCE_QUEUE, BATCHES_QUEUE)
RUN_JOB = "ponder.run_job"
REQUEUE_EXPIRED_LEASES = "ponder.requeue_expired_leases"
EXPIRE_JOBS = "ponder.expire_jobs"
DELIVER_WEBHOOK = "ponder.deliver_webhook"
SWEEP_WEBHOOKS = "ponder.sweep_webhooks"
VALIDATE_BATCH = "ponder.validate_batch"
ADVANCE_BATCHES = "ponder.advance_batches"
PURGE_OLD_JOBS = "ponder.purge_old_jobs"
# Redis transport priorities (kombu): each queue is a list per step of [0, 3, 6, 9], and a worker
# pops from 0's first. Jobs of batches go to 9, so a worker takes every waiting job of a direct
# request before the next batch job: a batch fills only the capacity interactive traffic leaves.
BATCH_PRIORITY = 9


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # Each queue with its own exchange and routing key: queues declared without them all bind
        # to the default exchange under the default key, and a message then lands in any of them.
        "task_queues": [_queue(name) for name in QUEUES],
        "task_default_queue": INFERENCE_QUEUE,
        "task_default_exchange": INFERENCE_QUEUE,
        "task_default_routing_key": INFERENCE_QUEUE,
        "task_create_missing_queues": False,
        "task_routes": {
            RUN_JOB: {"queue": INFERENCE_QUEUE},
            REQUEUE_EXPIRED_LEASES: {"queue": MAINTENANCE_QUEUE},
            EXPIRE_JOBS: {"queue": MAINTENANCE_QUEUE},
            DELIVER_WEBHOOK: {"queue": WEBHOOKS_QUEUE},
            SWEEP_WEBHOOKS: {"queue": MAINTENANCE_QUEUE},
            VALIDATE_BATCH: {"queue": BATCHES_QUEUE},
            ADVANCE_BATCHES: {"queue": BATCHES_QUEUE},
            PURGE_OLD_JOBS: {"queue": MAINTENANCE_QUEUE},
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # results live in the database
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 20,
    }


@lru_cache(maxsize=1)
def celery_client() -> Celery:
    """A sending-only Celery app for the API process (no task code, no torch)."""
    app = Celery("ponder")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue_job(job_id: str, batch: bool = False) -> None:
    """`batch`: the job is a batch's line, queued behind every direct one (BATCH_PRIORITY). A direct
    job is announced on DIRECT_JOB_CHANNEL first: a publish is one Redis command, the message a
    few milliseconds of Celery's, and a slot woken by the announcement takes the job without it."""
    if not batch:
        announce_direct_job(job_id)
    priority = BATCH_PRIORITY if batch else None
    celery_client().send_task(
        RUN_JOB, args=[job_id], task_id=job_id, queue=INFERENCE_QUEUE, priority=priority, add_to_parent=False
    )


# A direct job's message is announced here too: the worker slots kept for direct work, held by batch
# lines waiting for room, wake at once for it (ponder/workers/admission.py).
DIRECT_JOB_CHANNEL = "ponder:direct-job-queued"


def announce_direct_job(job_id: str) -> None:
    try:
        sync_redis(get_settings().redis_url).publish(DIRECT_JOB_CHANNEL, job_id)
    except RedisError as e:  # best effort: the waiting slots also look every so often
        logger.warning("could not announce direct job %s (%s)", job_id, e)


def waiting_job_messages() -> int:
    """Messages in the inference queue that no worker has taken yet (all priorities); 0 while no
    worker has declared the queue (Redis keeps no empty queue)."""
    with celery_client().connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue=INFERENCE_QUEUE, passive=True).message_count
        except ChannelError:  # not declared yet
            return 0


def enqueue_batch_jobs(job_ids: list) -> None:
    """A batch's jobs, after the commit that created them, over one broker connection. A message
    that never leaves is sent again by maintenance (the job stays queued in the database)."""
    app = celery_client()
    with app.producer_or_acquire() as producer:
        for job_id in job_ids:
            app.send_task(
                RUN_JOB,
                args=[str(job_id)],
                task_id=str(job_id),
                queue=INFERENCE_QUEUE,
                priority=BATCH_PRIORITY,
                producer=producer,
                # Sent from inside the validation task: by default Celery keeps each message's
                # AsyncResult in that task's `children` until it ends, ~2 KB a line (10,000 lines: 20 MiB).
                add_to_parent=False,
            )


def enqueue_batch_validation(batch_id: str) -> None:
    celery_client().send_task(VALIDATE_BATCH, args=[batch_id], queue=BATCHES_QUEUE)


def enqueue_batch_advance(batch_id: str | None = None) -> None:
    """Move one batch on now (a cancel), or every unfinished one (beat's schedule)."""
    celery_client().send_task(ADVANCE_BATCHES, args=[batch_id], queue=BATCHES_QUEUE)


def enqueue_delivery(delivery_id: str) -> None:
    """One attempt of a webhook delivery. Several messages for one delivery are harmless: the
    attempt claims the row first, and a delivery not due or already leased is skipped."""
    celery_client().send_task(DELIVER_WEBHOOK, args=[delivery_id], queue=WEBHOOKS_QUEUE)


def enqueue_deliveries(delivery_ids: list) -> None:
    """After the commit that created them; a message that never leaves is sent by the sweep."""
    for delivery_id in delivery_ids:
        try:
            enqueue_delivery(str(delivery_id))
        except Exception:  # the broker is away: the sweep sends due deliveries
            logger.exception("could not enqueue delivery %s; the sweep will send it", delivery_id)


class BackgroundPublisher:
    """Sends job (webhook delivery, batch) messages from one thread of the API process, after the
    response has gone out: a request waits for its database commit, not for broker round trips.
    A job whose message never leaves (the process dies first) is still queued in the database,
    and maintenance sends it again; a duplicate delivery is harmless (the worker's claim skips it)."""

    def __init__(self) -> None:
        self._pending: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: str) -> None:
        self._put(("job", job_id))

    def submit_delivery(self, delivery_id: str) -> None:
        self._put(("delivery", delivery_id))

    def submit_batch(self, batch_id: str) -> None:
        """Its validation (a lost message: beat sends it again, ponder/service/openai/batches.py)."""
        self._put(("batch", batch_id))

    def submit_batch_advance(self, batch_id: str) -> None:
        self._put(("batch-advance", batch_id))

    def _put(self, item: tuple[str, str]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-publisher", daemon=True)
                self._thread.start()
        self._pending.put(item)

    def _run(self) -> None:
        while True:
            kind, item_id = self._pending.get()
            try:
                _SENDERS[kind](item_id)
            except Exception:  # the broker is away: maintenance re-sends queued jobs and due deliveries
                logger.exception("could not enqueue %s %s; maintenance will send it", kind, item_id)


_SENDERS: dict[str, Callable[[str], None]] = {
    "job": enqueue_job,
    "delivery": enqueue_delivery,
    "batch": enqueue_batch_validation,
    "batch-advance": enqueue_batch_advance,
}
publisher = BackgroundPublisher()


def revoke_job(job_id: str) -> None:
    celery_client().control.revoke(job_id)
