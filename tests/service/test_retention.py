"""Erasing jobs (ponder/service/retention.py) on a real database, SQLite and PostgreSQL: DELETE's rules
(a finished job erased with its usage kept, 409 for a queued or running one, 404 for another key's
or an unknown one) and beat's retention sweep (only jobs finished longer ago than
PONDER_RETENTION_DAYS, in chunks, once)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session

from ponder.service import db
from ponder.service.errors import ServiceError, status_code_of
from ponder.service.job_rules import delete_job, usage_report
from ponder.service.settings import Settings, get_settings
from ponder.service.tables import ApiKey, Job, JobStatus, WebhookDelivery, utcnow
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
        checkpoint={"model": "m", "token_ids": [1, 2, 3], "stream_id": "1-0"},
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
    assert (job.content, job.reasoning_content, job.answer, job.samples, job.checkpoint, job.error) == (None,) * 6
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
