"""The API's Prometheus metrics: requests by route template and status (counted in this process),
and at scrape time jobs by status, webhook deliveries by status and tokens by model (one grouped
query each), queue depth per queue (Redis LLEN) and inference workers alive (their heartbeats).

With several uvicorn processes (`ponder api --workers N`) request metrics go through
prometheus_client's multiprocess mode, so any process's /metrics reports all of them.
"""

from __future__ import annotations

import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from ponder.service.queue import QUEUES
from ponder.service.streams import WORKER_KEY_PREFIX
from ponder.service.tables import DeliveryStatus, Job, JobStatus, WebhookDelivery

REQUESTS = Counter("ponder_http_requests", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "ponder_http_request_duration_seconds",
    "Time to the end of the response (a stream counts until it closes)",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
UNMATCHED = "<unmatched>"  # any path no route knows: one label, whatever scanners try
# kombu's Redis transport keeps a queue's prioritised messages in sibling lists ("\x06\x16" + step).
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class HttpMetrics:
    """ASGI middleware: counts each HTTP request under its route template (`/v1/jobs/{job_id}`),
    never the raw path, so ids do not become label values."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500 unless a response starts

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            labels = (scope["method"], getattr(route, "path", UNMATCHED), str(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - started)


def request_registry():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY  # with the process and Python collectors


class Snapshot:
    """A one-scrape collector of families computed beforehand (the Redis reads are async)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families


def database_families(engine: Engine) -> list[Metric]:
    """Jobs and deliveries by status, tokens of finished jobs by model: grouped counts the status
    indexes serve (the token sums read the finished jobs)."""
    with Session(engine) as session:
        jobs = dict(session.exec(select(Job.status, func.count()).group_by(Job.status)).all())
        deliveries = dict(
            session.exec(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all()
        )
        tokens = session.exec(
            select(Job.model, func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens), func.sum(Job.cached_tokens))
            .where(col(Job.finished_at).is_not(None))
            .group_by(Job.model)
        ).all()
    job_family = GaugeMetricFamily("ponder_jobs", "Jobs by status", labels=["status"])
    for job_status in JobStatus:
        job_family.add_metric([job_status.value], jobs.get(job_status.value, 0))
    delivery_family = GaugeMetricFamily("ponder_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
    for delivery_status in DeliveryStatus:
        delivery_family.add_metric([delivery_status.value], deliveries.get(delivery_status.value, 0))
    token_family = CounterMetricFamily(
        "ponder_tokens",
        "Tokens of finished jobs by model and kind (cached: prompt tokens from the prefix cache)",
        labels=["model", "kind"],
    )
    for model, prompt, completion, cached in tokens:
        for kind, value in (("prompt", prompt), ("completion", completion), ("cached", cached)):
            token_family.add_metric([model, kind], value or 0)
    return [job_family, delivery_family, token_family]


async def redis_families(redis) -> list[Metric]:
    queues = QUEUES
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
    lengths = await pipe.execute()
    depth = GaugeMetricFamily("ponder_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
    for i, queue in enumerate(queues):
        n = len(_PRIORITY_SUFFIXES)
        depth.add_metric([queue], sum(lengths[i * n : (i + 1) * n]))
    workers = len([key async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000)])
    alive = GaugeMetricFamily("ponder_inference_workers", "Inference workers with a live heartbeat", workers)
    return [depth, alive]


def exposition(families: list[Metric]) -> bytes:
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(Snapshot(families))
    return generate_latest(request_registry()) + generate_latest(snapshot)
