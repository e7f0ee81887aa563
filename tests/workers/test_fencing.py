"""Every write a worker makes is fenced by the claim it holds (issue: `_flush_progress`, `_finish`
and `_fail` once updated `WHERE id = ...` only, so a worker whose lease lapsed while another
worker claimed the job could flip a failed job to succeeded and send a second final webhook).
Real databases (SQLite and PostgreSQL) and a real Redis; the worker's own functions."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial

import pytest
import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import event as sa_event
from sqlalchemy import text, update
from sqlalchemy.orm import Session as SaSession
from sqlmodel import Session, col

from ponder.engine.outputs import RequestOutput, Usage
from ponder.service.db import database_engine
from ponder.service.settings import Settings
from ponder.service.streams import WORKER_KEY_PREFIX, JobSignals, stream_key, stream_owner_key
from ponder.service.tables import ApiKey, Job, JobStatus, utcnow
from ponder.workers import job_runner, maintenance
from ponder.workers.claim import Claim, LostClaim, claim_job
from ponder.workers.job_runner import GeneratedSoFar
from ponder.workers.job_stream import JobStream
from ponder.workers.outages import until_redis_answers


@pytest.fixture
def redis(settings):
    return redis_lib.Redis.from_url(settings.redis_url, decode_responses=True)


def queued_job(settings: Settings) -> uuid.UUID:
    with Session(database_engine(settings.database_url)) as session:
        key = ApiKey(name="t", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2)
        job = Job(
            api_key_id=key.id,
            model="tiny-llama",
            request={"prompt": "x", "max_tokens": 4},
            prompt_token_ids=[1, 2, 3],
            expires_at=utcnow() + timedelta(hours=1),
        )
        session.add_all([key, job])
        session.commit()
        return job.id


def lapse_lease(settings: Settings, job_id: uuid.UUID) -> None:
    with Session(database_engine(settings.database_url)) as session:
        past = utcnow() - timedelta(seconds=1)
        session.exec(update(Job).where(col(Job.id) == job_id).values(lease_expires_at=past))  # type: ignore[call-overload]
        session.commit()


def row(settings: Settings, job_id: uuid.UUID) -> Job:
    with Session(database_engine(settings.database_url)) as session:
        return session.get_one(Job, job_id)


def claimed(settings: Settings, redis, job_id: uuid.UUID, worker: str) -> tuple[Job, Claim, JobStream]:
    job = claim_job(job_id, worker, settings)
    assert job is not None
    claim = Claim(job.id, worker, job.attempts)
    stream = JobStream(redis, claim)
    stream.take(600, "restart" if job.attempts > 1 else "")
    return job, claim, stream


def finished_output(text: str) -> GeneratedSoFar:
    output = RequestOutput(request_id="r", finished=True, finish_reason="length", content=text, text=text)
    output.usage = Usage(prompt_tokens=3, completion_tokens=4)
    return GeneratedSoFar(content=[text], completion_tokens=4, final=output)


def requeue_expired(settings):
    """Maintenance's pass over expired leases, asking this test's Redis which workers live."""
    signals = JobSignals(settings.redis_url)
    end_streams = partial(signals.expire_streams, seconds=settings.stream_ttl_seconds)
    return maintenance.requeue_expired_leases(settings, signals.worker_alive, end_streams)


def test_a_worker_that_lost_its_claim_changes_neither_the_row_nor_the_stream(settings, redis):
    job_id = queued_job(settings)
    job_a, claim_a, stream_a = claimed(settings, redis, job_id, "worker-a")
    stream_a.append(("content", "from a", 1, 0))
    lapse_lease(settings, job_id)  # worker a stalls (SIGSTOP, GC pause) past its lease
    job_b, claim_b, stream_b = claimed(settings, redis, job_id, "worker-b")
    assert (job_b.attempts, job_b.worker) == (2, "worker-b")

    # Worker a wakes up: every write it tries finds the job is no longer its own.
    with pytest.raises(LostClaim):
        job_runner._flush_progress(claim_a, GeneratedSoFar(content=["stale"]), settings)
    with pytest.raises(LostClaim):
        job_runner._fail(claim_a, "RuntimeError: stale", settings)
    with pytest.raises(LostClaim):
        job_runner._finish(job_a, claim_a, finished_output("stale result"), settings)
    with pytest.raises(LostClaim):
        stream_a.append(("content", "stale delta", 2, 0))
        stream_a.flush()
    current = row(settings, job_id)
    assert (current.status, current.worker, current.attempts, current.content) == ("running", "worker-b", 2, None)
    assert [f["type"] for _, f in redis.xrange(stream_key(job_id))] == ["reset"]  # b started it over

    # Worker b owns it: its writes land, and a's late failure still cannot undo them.
    stream_b.append(("content", "from b", 1, 0))
    assert job_runner._flush_progress(claim_b, GeneratedSoFar(content=["from b"]), settings) is False
    assert job_runner._finish(job_b, claim_b, finished_output("from b"), settings) == "succeeded"
    with pytest.raises(LostClaim):
        job_runner._fail(claim_a, "RuntimeError: late", settings)
    final = row(settings, job_id)
    assert (final.status, final.content, final.error) == ("succeeded", "from b", None)
    with pytest.raises(LostClaim):  # finished: not even b writes any more
        job_runner._fail(claim_b, "RuntimeError: after the end", settings)


def test_an_older_attempt_cannot_take_the_stream_back(settings, redis):
    job_id = queued_job(settings)
    claimed(settings, redis, job_id, "worker-a")
    lapse_lease(settings, job_id)
    claimed(settings, redis, job_id, "worker-b")
    with pytest.raises(LostClaim):  # a's claim reached Redis late: attempt 1 < 2
        JobStream(redis, Claim(job_id, "worker-a", 1)).take(600)


def test_a_cancelled_job_whose_worker_died_ends_cancelled_at_once(settings, redis):
    # Before: requeued with cancel_requested, never claimable again, `expired` only at its deadline.
    job_id = queued_job(settings)
    _, claim, _ = claimed(settings, redis, job_id, "worker-a")
    job_runner._flush_progress(claim, GeneratedSoFar(content=["partial"], completion_tokens=2), settings)
    with Session(database_engine(settings.database_url)) as session:
        session.exec(update(Job).where(col(Job.id) == job_id).values(cancel_requested=True))  # type: ignore[call-overload]
        session.commit()
    lapse_lease(settings, job_id)  # worker a died before it saw the cancel
    counts = requeue_expired(settings)
    assert counts["cancelled"] == 1 and counts["requeued"] == 0
    job = row(settings, job_id)
    assert (job.status, job.content, job.completion_tokens, job.finish_reason) == (
        JobStatus.cancelled,
        "partial",
        2,
        "abort",
    )
    assert job.finished_at is not None and job.lease_expires_at is None


def test_the_attempt_budget_counts_only_attempts_whose_worker_is_gone(settings, redis):
    # Before: every claim spent an attempt, so drains and leases lost while the worker lived on
    # (a pause, a Redis outage) could fail a healthy job "worker lost too many times".
    job_id = queued_job(settings)
    redis.set(WORKER_KEY_PREFIX + "alive", "{}", ex=600)
    for _ in range(settings.max_attempts + 1):  # leases lost while its worker still beats
        claimed(settings, redis, job_id, "alive")
        lapse_lease(settings, job_id)
        assert requeue_expired(settings)["requeued"] == 1
    _, claim, _ = claimed(settings, redis, job_id, "alive")
    job_runner._release(claim, GeneratedSoFar(), settings, None)  # a drain hands it back
    job = row(settings, job_id)
    assert (job.status, job.faults, job.attempts) == (JobStatus.queued, 0, settings.max_attempts + 2)

    for faults in range(1, settings.max_attempts + 1):  # its worker dies each time: the job's fault, maybe
        claimed(settings, redis, job_id, "gone")
        lapse_lease(settings, job_id)
        counts = requeue_expired(settings)
        assert row(settings, job_id).faults == faults
    assert counts == {"requeued": 0, "failed": 1, "cancelled": 0, "resent": 0}
    job = row(settings, job_id)
    assert job.status == JobStatus.failed and "max_attempts" in (job.error or "")


def test_stream_writes_wait_for_redis_instead_of_failing_the_job(settings, redis):
    # Redis away (restarting from its AOF): the entries wait in memory, then go out in order.
    job_id = queued_job(settings)
    _, _, stream = claimed(settings, redis, job_id, "worker-a")
    stream.append(("reasoning", "one ", 1, 0))
    no_retry = Retry(NoBackoff(), 0)
    stream.redis = redis_lib.Redis(port=1, socket_connect_timeout=0.2, retry=no_retry)  # nothing listens there
    stream.append(("reasoning", "two ", 2, 0))
    stream.append(("content", "three", 3, 0))
    stream.flush()
    assert stream.pending and stream.deferring  # kept, not lost, not raised
    stream.redis = redis
    stream.end(ttl_seconds=60)
    entries = [(f["type"], f.get("delta", "")) for _, f in redis.xrange(stream_key(job_id))]
    assert entries == [("reasoning", "one "), ("reasoning", "two "), ("content", "three"), ("done", "")]
    assert 0 < redis.ttl(stream_key(job_id)) <= 60


def test_taking_a_stream_waits_out_a_short_redis_outage(settings, redis):
    # A claim made while Redis restarts: the stream is taken once it answers, not failed.
    job_id = queued_job(settings)
    job = claim_job(job_id, "worker-a", settings)
    assert job is not None
    stream = JobStream(
        redis_lib.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)), Claim(job_id, "worker-a", 1)
    )
    calls = []

    def take() -> int:
        calls.append(1)
        if len(calls) == 3:
            stream.redis = redis  # Redis is back
        return job_runner._take_stream(stream, job, None, settings)

    assert until_redis_answers(take, settings) == 0
    assert len(calls) == 3 and redis.get(stream_owner_key(job_id)) == "1:worker-a"


def test_a_resumed_attempt_drops_what_the_dead_one_streamed_past_its_checkpoint(settings, redis):
    job_id = queued_job(settings)
    _, _, first = claimed(settings, redis, job_id, "worker-a")
    first.append(("reasoning", "ab", 2, 0))
    checkpoint = first.last_id  # what the progress flush recorded with the token ids (2 of them)
    first.append(("reasoning", "cd", 4, 0), ("content", "e", 5, 0))
    first.flush()  # streamed, then the worker died
    lapse_lease(settings, job_id)
    job = claim_job(job_id, "worker-b", settings)
    assert job is not None
    second = JobStream(redis, Claim(job_id, "worker-b", job.attempts))
    wasted = second.take(600, "resume", checkpoint, {"reasoning": 2, "content": 0}, resumed_tokens=2)
    assert wasted == 3  # the dead attempt generated 5 tokens; the checkpoint kept 2
    second.append(("reasoning", "CD", 4, 0))
    entries = [(f["type"], f.get("delta")) for _, f in redis.xrange(stream_key(job_id))]
    assert entries == [("reasoning", "ab"), ("rewind", '{"reasoning": 2, "content": 0}'), ("reasoning", "CD")]
    # Nothing streamed past the checkpoint: no rewind at all, nothing thrown away.
    lapse_lease(settings, job_id)
    job = claim_job(job_id, "worker-c", settings)
    assert job is not None
    third = JobStream(redis, Claim(job_id, "worker-c", job.attempts))
    assert third.take(600, "resume", second.last_id, {"reasoning": 4, "content": 0}, resumed_tokens=4) == 0
    assert len(redis.xrange(stream_key(job_id))) == 3
    # A restart (no usable checkpoint) throws away every token generated so far.
    lapse_lease(settings, job_id)
    job = claim_job(job_id, "worker-d", settings)
    assert job is not None
    assert JobStream(redis, Claim(job_id, "worker-d", job.attempts)).take(600, "restart") == 4


def test_a_streams_deltas_are_coalesced_and_it_expires_whoever_ends_it(settings, redis):
    """An entry per token per sample, with no expiry until the worker's own end, before: millions of
    entries for a long n = 64 job, kept for ever when beat ended the job instead."""
    settings = settings.model_copy(update={"stream_ttl_seconds": 30})
    job_id = queued_job(settings)
    _, _, stream = claimed(settings, redis, job_id, "worker-a")
    tokens = [("reasoning", f"r{i} ", i, sample) for i in range(100) for sample in (0, 1)]
    tokens += [("content", f"c{i} ", 100 + i, sample) for i in range(20) for sample in (0, 1)]
    for token in tokens:  # a token at a time, faster than the write interval
        stream.append(token)
    stream.flush()
    entries = [fields for _, fields in redis.xrange(stream_key(job_id))]
    assert len(entries) <= 1 + 2 * 2  # the first token's write, then one entry per sample and kind
    for sample in ("0", "1"):  # nothing lost, nothing out of order within a sample
        text = {
            kind: "".join(f["delta"] for f in entries if f["type"] == kind and f["sample"] == sample)
            for kind in ("reasoning", "content")
        }
        assert text == {
            "reasoning": "".join(f"r{i} " for i in range(100)),
            "content": "".join(f"c{i} " for i in range(20)),
        }
    assert max(int(f["at"]) for f in entries) == 119
    # while the job runs the stream expires with the attempt's own (the job's deadline, 600 s here),
    # whether its worker ends it or not
    assert settings.stream_ttl_seconds < redis.ttl(stream_key(job_id)) <= 600
    # beat ends the job (its worker lost every time, out of attempts): the stream gets its own time
    while row(settings, job_id).status != JobStatus.failed:
        lapse_lease(settings, job_id)
        requeue_expired(settings)
        if row(settings, job_id).status == JobStatus.queued:
            claimed(settings, redis, job_id, "gone")
    assert 0 < redis.ttl(stream_key(job_id)) <= settings.stream_ttl_seconds


def test_a_final_write_is_durable_before_anyone_is_told(settings, redis):
    """The workers commit without waiting for PostgreSQL's WAL flush (progress may be lost to a
    crash: the lease recovers it). A final state was committed so too, and its webhook went out at
    once: a crash 25 ms later lost the result a receiver had been told of, and the job ran again."""
    postgresql = settings.database_url.startswith("postgresql")
    # SQLite: the workers' connections are as durable as any (WAL, synchronous NORMAL = 1)
    progress, final = ("off", "on") if postgresql else (1, 1)
    seen: list[str] = []

    def record(session) -> None:
        query = "SHOW synchronous_commit" if postgresql else "PRAGMA synchronous"
        seen.append(session.execute(text(query)).scalar())

    job_id = queued_job(settings)
    job, claim, _ = claimed(settings, redis, job_id, "worker-a")
    sa_event.listen(SaSession, "before_commit", record)
    try:
        job_runner._flush_progress(claim, GeneratedSoFar(content=["partial"], completion_tokens=2), settings)
        assert seen == [progress]  # asynchronous still
        assert job_runner._finish(job, claim, finished_output("the answer"), settings) == "succeeded"
        # SQLite: nobody listens, so the result is one statement committed as it runs, on a
        # connection of the same engine (tests/workers/test_sqlite_write_lock.py)
        assert seen == ([progress, final] if postgresql else [progress])
        other = queued_job(settings)
        _, other_claim, _ = claimed(settings, redis, other, "worker-a")
        seen.clear()
        job_runner._fail(other_claim, "RuntimeError: boom", settings)
        assert seen == [final]
    finally:
        sa_event.remove(SaSession, "before_commit", record)
