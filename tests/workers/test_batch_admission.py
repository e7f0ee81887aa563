"""A batch's lines count against their key's limits (ponder/workers/batch_admission.py), on real
databases and a real Redis, through the validation the batches worker runs: lines within the day
become jobs with their tokens reserved; the first line the day has no room for, and the rest, are
refused alone with the 429 their route would answer. Batch lines were exempt: `--tokens-per-day`
was no spend cap for a key that used batches. Likewise the key's enqueued tokens (its batch lines
waiting to start, across batches): a second batch gets only the room the first one left."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import redis as redis_lib
from sqlmodel import Session, select

from ponder.service.db import database_engine
from ponder.service.rate_limits import PREFIX
from ponder.service.tables import ApiKey, Batch, BatchLineError, BatchStatus, FilePurpose, Job, StoredFile, utcnow
from ponder.workers.batches import validate_batch

MAX_TOKENS = 40


def line(i: int) -> bytes:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
    return json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


def new_key(settings, tokens_per_day: int | None = None) -> uuid.UUID:
    with Session(database_engine(settings.database_url)) as session:
        key = ApiKey(name="b", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2)
        key.tokens_per_day = tokens_per_day
        session.add(key)
        session.commit()
        return key.id


def new_batch(settings, key_id: uuid.UUID, lines: int) -> str:
    """A validating batch of `lines` lines, as POST /v1/batches stores it."""
    path_id = f"file-{uuid.uuid4().hex}"
    (settings.files_dir).mkdir(parents=True, exist_ok=True)
    (settings.files_dir / path_id).write_bytes(b"\n".join(line(i) for i in range(lines)) + b"\n")
    with Session(database_engine(settings.database_url)) as session:
        session.add(StoredFile(id=path_id, api_key_id=key_id, purpose=FilePurpose.batch, filename="in", bytes=1))
        batch = Batch(
            id=f"batch_{uuid.uuid4().hex}",
            api_key_id=key_id,
            endpoint="/v1/chat/completions",
            input_file_id=path_id,
            completion_window="24h",
            expires_at=utcnow() + timedelta(hours=24),
        )
        session.add(batch)
        session.commit()
        return batch.id


def test_batch_lines_are_held_to_the_keys_tokens_per_day(settings):
    settings = settings.model_copy(update={"model": "tiny-llama"})
    key_id = new_key(settings, tokens_per_day=2 * 60)
    batch_id = new_batch(settings, key_id, 5)
    assert validate_batch(batch_id, settings) == "in progress: 5 lines stored"
    with Session(database_engine(settings.database_url)) as session:
        jobs = session.exec(select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_line)).all()
        refused = session.exec(select(BatchLineError).where(BatchLineError.batch_id == batch_id)).all()
        assert session.get_one(Batch, batch_id).status == BatchStatus.in_progress
    cost = len(jobs[0].prompt_token_ids) + MAX_TOKENS  # each line's prompt + max tokens
    admitted = (2 * 60) // cost
    assert 0 < admitted < 5 and [job.batch_line for job in jobs] == list(range(1, admitted + 1))
    assert sorted(e.line for e in refused) == list(range(admitted + 1, 6))
    assert {e.status_code for e in refused} == {429}
    assert all("tokens per day" in e.body["error"]["message"] for e in refused)
    client = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True)
    day = next(client.scan_iter(match=f"{PREFIX}{key_id}:tpd:*"))
    assert int(client.get(day)) == admitted * cost  # reserved, to be settled by the workers
    assert all(client.exists(f"{PREFIX}job:{job.id}") for job in jobs)


def test_a_keys_batch_lines_waiting_to_start_are_held_to_its_enqueued_tokens(settings):
    settings = settings.model_copy(update={"model": "tiny-llama"})
    key_id = new_key(settings)
    first = new_batch(settings, key_id, 3)
    assert validate_batch(first, settings) == "in progress: 3 lines stored"
    with Session(database_engine(settings.database_url)) as session:
        prompt = session.exec(select(Job).where(Job.batch_id == first)).first().prompt_tokens
    # Room for the first batch's three waiting lines and two more: the second batch gets two of four.
    settings = settings.model_copy(update={"batch_enqueued_tokens_per_key": 5 * prompt})
    second = new_batch(settings, key_id, 4)
    assert validate_batch(second, settings) == "in progress: 4 lines stored"
    with Session(database_engine(settings.database_url)) as session:
        jobs = session.exec(select(Job).where(Job.batch_id == second).order_by(Job.batch_line)).all()
        refused = session.exec(select(BatchLineError).where(BatchLineError.batch_id == second)).all()
        assert [job.batch_line for job in jobs] == [1, 2]
        assert sorted(e.line for e in refused) == [3, 4] and {e.status_code for e in refused} == {429}
        assert {e.body["error"]["code"] for e in refused} == {"token_limit_exceeded"}
        # Lines that started no longer wait: the room comes back.
        for job in session.exec(select(Job).where(Job.batch_id == first)).all():
            job.status = "running"
            session.add(job)
        session.commit()
    third = new_batch(settings, key_id, 3)
    validate_batch(third, settings)
    with Session(database_engine(settings.database_url)) as session:
        assert len(session.exec(select(Job).where(Job.batch_id == third)).all()) == 3
