"""The rate limiter on a real Redis (a database of its own) and a real SQLite database: requests
per minute, tokens per minute and per day reserved then settled (once, however often settled),
jobs at once (pruned against the database), windows that roll, atomicity under concurrent
callers, a request too large for any window, and Redis away (admitted: fail open)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis
import redis.asyncio
from sqlmodel import Session

from ponder.service import rate_limits
from ponder.service.db import database_engine, upgrade
from ponder.service.errors import LimitExceeded, status_code_of
from ponder.service.rate_limits import Limits, RateLimitCharge
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Job, JobStatus, utcnow
from tests.stack import ponder, start_redis

# The stack's database is PONDER_TEST_REDIS_DB; this one is next to it (a run owns N-1..N+2).
REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1


@pytest.fixture
def redis_url(tmp_path, monkeypatch):
    url, process = start_redis(tmp_path, db=REDIS_DB)  # flushed
    monkeypatch.setenv("PONDER_REDIS_URL", url)  # settings() reads it
    yield url
    if process is not None:
        process.kill()


@pytest.fixture
def session(tmp_path):
    url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(url)
    with Session(database_engine(url)) as session:
        yield session


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def charge(key_id: uuid.UUID | None = None, window: float = 60, day: float = 86400, **limits: int) -> RateLimitCharge:
    s = settings(rate_limit_window_seconds=window, rate_limit_day_seconds=day)
    return RateLimitCharge(key_id or uuid.uuid4(), Limits(**limits), s)


def count(a: RateLimitCharge, url: str) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        try:
            await a.count_request(client)
        finally:
            await client.aclose()

    asyncio.run(run())


def refusal(action) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as refused:
        action()
    assert status_code_of(refused.value) == 429
    return refused.value


def add_job(session: Session, key_id: uuid.UUID, job_id: uuid.UUID, status: JobStatus = JobStatus.queued) -> None:
    if session.get(ApiKey, key_id) is None:
        session.add(ApiKey(id=key_id, name="t", prefix=key_id.hex[:12], key_hash=key_id.hex))
        session.commit()  # the key's row first: PostgreSQL-style foreign keys
    session.add(
        Job(
            id=job_id,
            api_key_id=key_id,
            status=status,
            model="m",
            request={},
            prompt_token_ids=[1],
            expires_at=utcnow() + timedelta(hours=1),
        )
    )
    session.commit()


def test_limits_come_from_the_key_else_the_deployment():
    s = settings(rate_limit_requests_per_minute=10, rate_limit_tokens_per_day=500)
    key = ApiKey(name="k", prefix="p", key_hash="h", requests_per_minute=0, tokens_per_minute=7)
    assert Limits.of(key, s) == Limits(requests_per_minute=0, tokens_per_minute=7, tokens_per_day=500)


def test_requests_per_minute_refuse_with_the_wait_then_the_window_rolls(redis_url):
    a = charge(window=2, requests_per_minute=3)
    for remaining in (2, 1, 0):
        count(a, redis_url)
        assert a.headers["x-ratelimit-limit-requests"] == "3"
        assert a.headers["x-ratelimit-remaining-requests"] == str(remaining)
    error = refusal(lambda: count(a, redis_url))
    assert error.code == "rate_limit_exceeded" and "requests per minute" in error.message
    wait_ms = int(error.headers["retry-after-ms"])
    assert 0 < wait_ms <= 2000 and error.headers["Retry-After"] in ("1", "2")
    assert a.headers["x-ratelimit-remaining-requests"] == "0"
    time.sleep(wait_ms / 1000 + 0.05)
    count(a, redis_url)  # a new window
    assert a.headers["x-ratelimit-remaining-requests"] == "2"


def test_concurrent_requests_are_counted_atomically(redis_url):
    """40 requests at once from 40 connections, limit 7: exactly 7 admitted."""
    a = charge(requests_per_minute=7)

    async def run() -> list[bool]:
        clients = [redis.asyncio.Redis.from_url(redis_url, decode_responses=True) for _ in range(40)]

        async def one(client) -> bool:
            try:
                await RateLimitCharge(a.key_id, a.limits, a.settings).count_request(client)
                return True
            except LimitExceeded:
                return False

        try:
            return await asyncio.gather(*(one(c) for c in clients))
        finally:
            for c in clients:
                await c.aclose()

    assert sum(asyncio.run(run())) == 7


def test_tokens_are_reserved_then_settled_once(redis_url, session):
    a = charge(tokens_per_minute=100)
    first, second = uuid.uuid4(), uuid.uuid4()
    a.reserve(session, first, 60)
    assert (a.headers["x-ratelimit-limit-tokens"], a.headers["x-ratelimit-remaining-tokens"]) == ("100", "40")
    error = refusal(lambda: a.reserve(session, second, 60))
    assert "tokens per minute" in error.message and 0 < int(error.headers["retry-after-ms"]) <= 60_000
    # the first job ends having used 10 tokens: 90 are free again, however often it is settled
    assert rate_limits.settle(first, 10, settings()) is True
    assert rate_limits.settle(first, 10, settings()) is False  # a retried settle changes nothing
    assert rate_limits.settle(first, 0, settings()) is False
    a.reserve(session, second, 60)
    assert a.headers["x-ratelimit-remaining-tokens"] == "30"  # 10 + 60 used
    refusal(lambda: a.reserve(session, uuid.uuid4(), 31))
    a.reserve(session, uuid.uuid4(), 30)


def test_concurrent_reservations_never_exceed_the_limit(redis_url, session):
    a = charge(tokens_per_minute=1000)

    def one(_: int) -> bool:
        try:
            RateLimitCharge(a.key_id, a.limits, a.settings).reserve(session, uuid.uuid4(), 100)
            return True
        except LimitExceeded:
            return False

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(one, range(40))) == 10


def test_a_request_larger_than_the_limit_is_refused_for_good(redis_url, session):
    error = refusal(lambda: charge(tokens_per_minute=100).reserve(session, uuid.uuid4(), 101))
    assert error.code == "request_too_large" and error.headers == {"x-should-retry": "false"}


def test_daily_tokens_refuse_until_the_day_rolls(redis_url, session):
    """A "day" of 3 s (PONDER_RATE_LIMIT_DAY_SECONDS, only tests shorten it)."""
    a = charge(day=3, tokens_per_day=50)
    a.reserve(session, uuid.uuid4(), 50)
    error = refusal(lambda: a.reserve(session, uuid.uuid4(), 1))
    assert "tokens per day" in error.message
    wait_ms = int(error.headers["retry-after-ms"])
    assert 0 < wait_ms <= 3000
    time.sleep(wait_ms / 1000 + 0.05)
    a.reserve(session, uuid.uuid4(), 50)


def test_settling_after_the_window_rolled_leaves_the_new_window_alone(redis_url, session):
    a = charge(window=1, tokens_per_minute=100)
    job = uuid.uuid4()
    a.reserve(session, job, 100)
    time.sleep(1.1)
    a.reserve(session, uuid.uuid4(), 100)  # the new window is full
    assert rate_limits.settle(job, 0, settings()) is True  # refunds nothing into the new window
    refusal(lambda: a.reserve(session, uuid.uuid4(), 1))


def test_jobs_at_once_free_up_when_jobs_end(redis_url, session):
    key_id = uuid.uuid4()
    a = charge(key_id, max_concurrent_jobs=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for job in (first, second):
        a.reserve(session, job, 10)
        add_job(session, key_id, job)
    error = refusal(lambda: a.reserve(session, third, 10))
    assert "2 queued or running" in error.message and error.headers["retry-after-ms"] == "1000"
    rate_limits.settle(first, 5, settings())  # the worker's final write
    a.reserve(session, third, 10)
    add_job(session, key_id, third)
    # a job that ended without a settle (a queued job cancelled in the API) is pruned against the row
    job = session.get_one(Job, second)
    job.status = JobStatus.cancelled
    session.add(job)
    session.commit()
    fourth = uuid.uuid4()
    a.reserve(session, fourth, 10)
    live = redis.Redis.from_url(redis_url, decode_responses=True).zrange(a.prefix + "jobs", 0, -1)
    assert sorted(live) == sorted([str(third), str(fourth)])


def test_a_job_not_stored_gives_its_reservation_back(redis_url, session):
    a = charge(tokens_per_minute=100, max_concurrent_jobs=1)
    job = uuid.uuid4()
    a.reserve(session, job, 100)
    a.release(job)
    a.reserve(session, uuid.uuid4(), 100)


def test_unlimited_keys_touch_no_redis(redis_url, session):
    a = charge()
    count(a, redis_url)
    a.reserve(session, uuid.uuid4(), 10**9)
    assert a.headers == {}
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_redis_away_admits_and_logs(monkeypatch, session, caplog):
    """Fail open: an outage of the counters is not an outage of submissions."""
    monkeypatch.setenv("PONDER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setattr(rate_limits, "_last_warning", 0.0)
    a = charge(requests_per_minute=1, tokens_per_minute=1)
    with caplog.at_level(logging.WARNING, logger="ponder.api"):
        count(a, "redis://127.0.0.1:1/0")
        count(a, "redis://127.0.0.1:1/0")
        a.reserve(session, uuid.uuid4(), 100)
    assert rate_limits.settle(uuid.uuid4(), 1, settings()) is False
    assert "rate limits not enforced" in caplog.text and a.headers == {}


def test_keys_create_and_update_set_the_limits(tmp_path):
    env = {**os.environ, "PONDER_DATABASE_URL": f"sqlite:///{tmp_path / 'ponder.db'}", "PONDER_ENVIRONMENT": "test"}
    assert ponder(["db", "upgrade"], env).returncode == 0
    created = ponder(["keys", "create", "--name", "n", "--requests-per-minute", "5", "--tokens-per-day", "0"], env)
    assert created.returncode == 0, created.stderr
    key_id = re.search(r"created key ([0-9a-f-]{36})", created.stdout + created.stderr).group(1)  # type: ignore[union-attr]
    updated = ponder(["keys", "update", key_id, "--tokens-per-minute", "900", "--max-concurrent-jobs", "3"], env)
    assert updated.returncode == 0, updated.stderr
    with Session(database_engine(env["PONDER_DATABASE_URL"])) as session:
        key = session.get_one(ApiKey, uuid.UUID(key_id))
    assert (key.requests_per_minute, key.tokens_per_minute, key.tokens_per_day, key.max_concurrent_jobs) == (
        5,
        900,
        0,
        3,
    )
    refused = [
        ponder(["keys", "update", key_id], env),  # nothing to change
        ponder(["keys", "update", key_id, "--requests-per-minute", "-1"], env),
        ponder(["keys", "update", "no-such-key", "--requests-per-minute", "1"], env),
    ]
    assert [r.returncode != 0 for r in refused] == [True, True, True]
    assert "no key 'no-such-key'" in refused[2].stdout + refused[2].stderr
    # the fair-share weight (ponder/workers/job_picker.py) is set the same way
    assert ponder(["keys", "update", key_id, "--weight", "2.5"], env).returncode == 0
    assert ponder(["keys", "update", key_id, "--weight", "0"], env).returncode != 0
    with Session(database_engine(env["PONDER_DATABASE_URL"])) as session:
        assert session.get_one(ApiKey, uuid.UUID(key_id)).weight == 2.5
    assert "weight=2.5" in ponder(["keys", "list"], env).stdout


def test_jobs_at_once_count_their_samples(redis_url, session):
    """A job of n samples fills n of an engine's slots: it takes n of the key's places (it took one)."""
    key_id = uuid.uuid4()
    a = charge(key_id, max_concurrent_jobs=8)
    wide, narrow, more = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    a.reserve(session, wide, 10, samples=6)
    add_job(session, key_id, wide)
    error = refusal(lambda: a.reserve(session, more, 10, samples=3))
    assert "6 queued or running and 3 more" in error.message
    a.reserve(session, narrow, 10, samples=2)  # 6 + 2 = 8: the limit exactly
    add_job(session, key_id, narrow)
    refusal(lambda: a.reserve(session, more, 10))
    rate_limits.settle(wide, 5, settings())
    a.reserve(session, more, 10, samples=6)
    # more samples than the key may ever run at once: refused for good, not told to wait
    with pytest.raises(LimitExceeded) as never:
        a.reserve(session, uuid.uuid4(), 10, samples=9)
    assert status_code_of(never.value) == 429 and never.value.code == "request_too_large"
    # a pruned job gives back its samples too
    for job_id in (narrow,):
        row = session.get_one(Job, job_id)
        row.status = JobStatus.cancelled
        session.add(row)
    session.commit()
    a.reserve(session, uuid.uuid4(), 10, samples=2)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert sorted(client.hvals(a.prefix + "samples")) == ["2", "6"]
