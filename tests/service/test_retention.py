"""Erasing jobs (ponder/service/retention.py) on a real database, SQLite and PostgreSQL: DELETE's rules
(a finished job erased with its usage kept, 409 for a queued or running one, 404 for another key's
or an unknown one) and beat's retention sweep (only jobs finished longer ago than
PONDER_RETENTION_DAYS, in chunks, once)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session, col, select

from ponder.engine.outputs import TokenLogprob
from ponder.service import db
from ponder.service.errors import ServiceError, status_code_of
from ponder.service.job_rules import delete_job, usage_report
from ponder.service.logprobs import pack
from ponder.service.settings import Settings, get_settings
from ponder.service.tables import ApiKey, Job, JobStatus, WebhookAttempt, WebhookDelivery, utcnow
from ponder.service.webhooks.signing import event_payload
from ponder.workers import maintenance
from tests.stack import database

MESSAGES = [{"role": "user", "content": "my secret prompt"}]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, monkeypatch):
    """A migrated database that the workers' engine (sql_engine) uses too."""
    with database(request.param, tmp_path) as url:
        db.upgrade(url)
        monkeypatch.setenv("PONDER_DATABASE_URL", url)
        get_settings.cache_clear()
        db.database_engine.cache_clear()
        try:
            yield url
        finally:
            db.database_engine.cache_clear()
            get_settings.cache_clear()


def add_key(session: Session) -> ApiKey:
    key = ApiKey(name="t", prefix=uuid.uuid4().hex[:12], key_hash=uuid.uuid4().hex, webhook_secret="s")
    session.add(key)
    session.commit()
    return key


def add_job(session: Session, key: ApiKey, status: JobStatus, finished_days_ago: float | None) -> Job:
    finished = utcnow() - timedelta(days=finished_days_ago) if finished_days_ago is not None else None
    job = Job(
        api_key_id=key.id,
        model="m",
        status=status,
        request={"messages": MESSAGES, "max_tokens": 50, "temperature": 0.6},
        prompt_token_ids=[5, 6, 7],
        prompt_tokens=3,
        completion_tokens=40,
        reasoning_tokens=30,
        content="the secret answer \\boxed{42}",
        reasoning_content="secret thoughts",
        answer="42",
        samples=[{"content": "secret sample"}],
        logprobs=[pack([TokenLogprob(1, -0.5, top=((1, -0.5),))], 1)],
        prompt_logprobs=pack([TokenLogprob(6, -2.5)], 0),
        checkpoint={"model": "m", "token_ids": [1, 2, 3], "stream_id": "1-0", "logprobs": "0::"},
        error="it quoted: my secret prompt" if status == JobStatus.failed else None,
        expires_at=utcnow() + timedelta(days=1),
        finished_at=finished,
    )
    session.add(job)
    session.commit()
    return job


def assert_erased(job: Job) -> None:
    assert job.prompt_token_ids == [] and "messages" not in job.request
    assert job.request["max_tokens"] == 50 and job.request["temperature"] == 0.6  # parameters stay
    erased = (job.content, job.reasoning_content, job.answer, job.samples, job.logprobs, job.prompt_logprobs)
    assert erased + (job.checkpoint, job.error) == (None,) * 8
    assert (job.prompt_tokens, job.completion_tokens, job.reasoning_tokens) == (3, 40, 30)  # billing stays


def test_delete_erases_a_finished_job_and_refuses_the_rest(url):
    with Session(db.database_engine(url), expire_on_commit=False) as session:
        key, other = add_key(session), add_key(session)
        done = add_job(session, key, JobStatus.succeeded, 0)
        failed = add_job(session, key, JobStatus.failed, 0)
        queued = add_job(session, key, JobStatus.queued, None)
        running = add_job(session, key, JobStatus.running, None)
        delivery = WebhookDelivery(
            api_key_id=key.id,
            job_id=done.id,
            event_type="job.succeeded",
            url="https://example.com/hook",
            payload=json.dumps({"type": "job.succeeded", "data": {"id": str(done.id), "answer": "42"}}),
        )
        session.add(delivery)
        session.commit()
        before = usage_report(session, key)

        for job in (done, failed):
            delete_job(session, key, job.id)
        delete_job(session, key, done.id)  # again: nothing more to erase, no error
        for job in (queued, running):
            with pytest.raises(ServiceError) as refused:
                delete_job(session, key, job.id)
            assert status_code_of(refused.value) == 409 and refused.value.code == "job_not_finished"
        for job_key, job_id in ((other, done.id), (key, uuid.uuid4())):
            with pytest.raises(ServiceError) as missing:
                delete_job(session, job_key, job_id)
            assert status_code_of(missing.value) == 404

    with Session(db.database_engine(url)) as session:
        for job in (done, failed):
            assert_erased(session.get(Job, job.id))
        for job in (queued, running):
            kept = session.get(Job, job.id)
            assert kept.prompt_token_ids == [5, 6, 7] and kept.request["messages"] == MESSAGES
        assert json.loads(session.get(WebhookDelivery, delivery.id).payload)["data"]["answer"] is None
        assert usage_report(session, key) == before  # usage is billed still


def test_retention_erases_old_finished_jobs_in_chunks_once(url, monkeypatch):
    monkeypatch.setattr(maintenance, "PURGE_CHUNK", 2)
    with Session(db.database_engine(url), expire_on_commit=False) as session:
        key = add_key(session)
        old = [add_job(session, key, status, 10) for status in (JobStatus.succeeded,) * 3 + (JobStatus.failed,)]
        old.append(add_job(session, key, JobStatus.cancelled, 8))
        recent = add_job(session, key, JobStatus.succeeded, 6)
        running = add_job(session, key, JobStatus.running, None)
    deleted_streams: list = []
    settings = Settings(database_url=url, retention_days=7, _env_file=None)

    assert maintenance.purge_old_jobs(settings.model_copy(update={"retention_days": 0}), deleted_streams.extend) == {
        "erased": 0
    }
    assert maintenance.purge_old_jobs(settings, deleted_streams.extend) == {"erased": 5}
    assert sorted(deleted_streams) == sorted(job.id for job in old)
    assert maintenance.purge_old_jobs(settings, deleted_streams.extend) == {"erased": 0}  # idempotent

    with Session(db.database_engine(url)) as session:
        for job in old:
            assert_erased(session.get(Job, job.id))
        for job in (recent, running):
            kept = session.get(Job, job.id)
            assert kept.content == "the secret answer \\boxed{42}" and kept.prompt_token_ids == [5, 6, 7]


SECRET = "SECRET-9f2c"  # in every place a client's text can be
# Every column of jobs is erased (it can hold what the client sent or got back) or kept, and the
# test fails on a new column until it is put in one of the two.
ERASED_COLUMNS = {
    "request",  # its messages or raw prompt; the sampling parameters stay
    *("prompt_token_ids", "content", "reasoning_content", "answer", "samples", "vote", "checkpoint", "error"),
    *("logprobs", "prompt_logprobs"),  # the tokens' values name the tokens
}
KEPT_COLUMNS = {
    *("id", "api_key_id", "status", "priority", "model", "worker", "lease_expires_at", "attempts", "faults"),
    *("cancel_requested", "resumed_tokens", "wasted_tokens", "restart_reason", "stopped_early", "finish_reason"),
    *("early_stop_unspent_tokens", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens"),
    *("max_batch_size", "draft_tokens", "accepted_draft_tokens"),
    *("created_at", "started_at", "first_token_at", "finished_at", "expires_at", "updated_at"),
    # the client's own labels for the job, shown as given: its bookkeeping, not its content
    *("metadata", "idempotency_key", "webhook_url", "openai_response", "batch_id", "batch_line", "batch_custom_id"),
    "openai_completion",  # how a legacy completion is shown (echo, scored alone): no text
}


def secret_job(session: Session, key: ApiKey, request: dict) -> Job:
    job = Job(
        api_key_id=key.id,
        model="m",
        status=JobStatus.succeeded,
        request={**request, "max_tokens": 50},
        prompt_token_ids=[5, 6, 7],
        content=f"{SECRET} \\boxed{{42}}",
        reasoning_content=SECRET,
        answer=SECRET,
        samples=[{"content": SECRET, "reasoning_content": SECRET, "answer": SECRET}] * 2,
        vote={"answer": SECRET, "votes": {SECRET: 2}},
        checkpoint={"model": "m", "token_ids": [1, 2, 3], "stream_id": "1-0"},
        error=SECRET,
        expires_at=utcnow() + timedelta(days=1),
        finished_at=utcnow(),
    )
    session.add(job)
    session.flush()
    payload = event_payload(job, "job.succeeded", "https://ponder.example", "1700000000")
    delivery = WebhookDelivery(
        api_key_id=key.id, job_id=job.id, event_type="job.succeeded", url="https://example.com/h", payload=payload
    )
    session.add(delivery)
    session.flush()
    session.add(WebhookAttempt(delivery_id=delivery.id, attempt=1, status_code=200, response_body=f"got {SECRET}"))
    session.commit()
    return job


def test_erasure_leaves_none_of_the_clients_text(url):
    """A raw prompt stayed in `request`, the vote in webhook payloads and a receiver's echo in its
    attempts, before."""
    assert {c.name for c in Job.__table__.columns} == ERASED_COLUMNS | KEPT_COLUMNS  # type: ignore[attr-defined]
    with Session(db.database_engine(url), expire_on_commit=False) as session:
        key = add_key(session)
        jobs = [
            secret_job(session, key, {"prompt": SECRET}),
            secret_job(session, key, {"messages": [{"role": "user", "content": SECRET}]}),
        ]
        for job in jobs:
            delete_job(session, key, job.id)
    with Session(db.database_engine(url)) as session:
        for job in jobs:
            row = session.get(Job, job.id)
            erased = {name: getattr(row, "meta" if name == "metadata" else name) for name in ERASED_COLUMNS}
            assert SECRET not in json.dumps(erased, default=str), erased
            deliveries = session.exec(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)).all()
            assert deliveries and all(SECRET not in d.payload for d in deliveries)
            attempts = session.exec(
                select(WebhookAttempt).where(col(WebhookAttempt.delivery_id).in_([d.id for d in deliveries]))
            ).all()
            assert attempts and all(a.response_body is None and a.status_code == 200 for a in attempts)
