"""The real stack for end-to-end tests, once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import pytest
from openai import OpenAI

from ponder.cli.devstack import free_port
from tests.stack import database, make_stack, start_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url, process = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    if process is not None:
        process.terminate()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """The C++ CPU kernels, compiled here before any worker starts unless `make test` built them
    already (a first build takes a minute on a busy two-core machine, and a worker builds them
    before it takes jobs): no stack's start-up clock pays for it."""
    from ponder.kernels import cpu

    cpu.load()


@pytest.fixture(scope="session")
def stack(database_url, redis_url, tmp_path_factory):
    """API + inference worker + webhooks worker + batches worker + beat + Flower on tiny-llama, as
    real processes. Webhooks to loopback are allowed here (PONDER_ENVIRONMENT=test); see
    tests/e2e/test_webhooks.py for a second API with private addresses refused."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # nothing left over from the other database's stack
    stack = make_stack(
        tmp_path_factory.mktemp("stack"),
        database_url,
        redis_url,
        lease_seconds=5,
        resend_queued_after_seconds=3,
        maintenance_interval_seconds=1,
        # webhooks: retries a second apart (so each attempt's timestamp differs), no jitter, a
        # frequent sweep; a lease of a few seconds lets a killed worker's attempt be retried soon
        webhook_retry_schedule="1,1,1",
        webhook_retry_jitter=0,
        webhook_sweep_interval_seconds=0.5,
        webhook_resend_after_seconds=1,
        webhook_timeout_seconds=2,
        # operators' view (tests/e2e/test_operations.py): the worker's metrics endpoint and Flower
        worker_metrics_port=free_port(),
        flower_port=free_port(),
        metrics_cache_seconds=0,  # /metrics counts the database anew on each scrape: tests compare them
    )
    for name in ("api", "worker", "webhooks-worker", "batches-worker", "beat", "flower"):
        stack.start(name)
    try:
        stack.wait_ready()
        stack.wait_flower()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def sdk(stack):
    """OpenAI's own SDK on the stack's /v1. No retries: a retried request would be a second job,
    and a test must see the first answer."""
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=240)
    yield client
    client.close()
