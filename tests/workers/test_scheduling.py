"""Scheduling on the worker's side: the fair pick between keys (ponder/workers/job_picker.py) on real
databases, the engine's admission ledger (ponder/workers/kv_reservations.py), and take_job, which joins them:
a message stands for a slot, and the slot takes the fair pick if its engine can hold it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta

import pytest
import redis as redis_lib
from sqlalchemy import event, insert
from sqlmodel import Session

from ponder.service.db import database_engine, upgrade
from ponder.service.queue import INFERENCE_QUEUE, announce_direct_job, enqueue_job
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Batch, Job, JobStatus, utcnow
from ponder.workers import admission, job_runner, maintenance
from ponder.workers.job_picker import pick_next_job
from ponder.workers.kv_reservations import Demand, KvReservations

BLOCK = 16


class Tenants:
    """Keys and their jobs, written straight to the database; created_at strictly increasing."""

    def __init__(self, settings: Settings) -> None:
        self.engine = database_engine(settings.database_url)
        self.clock = utcnow() - timedelta(minutes=10)

    def key(self, weight: float = 1.0) -> uuid.UUID:
        with Session(self.engine) as session:
            key = ApiKey(name="t", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2, weight=weight)
            session.add(key)
            session.commit()
            return key.id

    def job(
        self, key: uuid.UUID, status: JobStatus = JobStatus.queued, batch: bool | str = False, **fields
    ) -> uuid.UUID:
        """`batch`: True for a job of a new batch, or the id of an existing one."""
        self.clock += timedelta(seconds=1)
        with Session(self.engine) as session:
            batch_id = batch if isinstance(batch, str) else self._batch(session, key) if batch else None
            job = Job(
                api_key_id=key,
                model="tiny-llama",
                request=fields.pop("request", {"prompt": "x", "max_tokens": fields.pop("max_tokens", 64)}),
                prompt_token_ids=fields.pop("prompt_token_ids", [1, 2, 3]),
                expires_at=utcnow() + timedelta(hours=1),
                status=status,
                batch_id=batch_id,
                **({"created_at": self.clock} | fields),
            )
            session.add(job)
            session.commit()
            return job.id

    def _batch(self, session: Session, key: uuid.UUID) -> str:
        batch = Batch(
            id=f"batch_{uuid.uuid4().hex}",
            api_key_id=key,
            endpoint="/v1/chat/completions",
            input_file_id="file-x",
            completion_window="24h",
            status="in_progress",
            expires_at=utcnow() + timedelta(hours=24),
        )
        session.add(batch)
        session.flush()
        return batch.id

    def pick(self) -> uuid.UUID | None:
        with Session(self.engine) as session:
            picked = pick_next_job(session, utcnow())
        return picked.job_id if picked else None


def test_the_key_with_the_least_running_work_goes_first(settings):
    tenants = Tenants(settings)
    flood, quiet = tenants.key(), tenants.key()
    tenants.job(flood, JobStatus.running)
    flood_jobs = [tenants.job(flood) for _ in range(5)]  # queued first
    quiet_job = tenants.job(quiet)
    assert tenants.pick() == quiet_job  # FIFO would give flood_jobs[0]
    tenants.job(quiet, JobStatus.running)
    tenants.job(quiet, JobStatus.running)
    assert tenants.pick() == flood_jobs[0]  # now the quiet key runs more: the oldest of the other's


def test_weights_divide_running_work_and_ties_go_to_the_oldest(settings):
    tenants = Tenants(settings)
    heavy, light = tenants.key(weight=3), tenants.key()
    for _ in range(2):
        tenants.job(heavy, JobStatus.running)
    tenants.job(light, JobStatus.running)
    light_job = tenants.job(light)
    heavy_job = tenants.job(heavy)
    assert tenants.pick() == heavy_job  # 2/3 < 1/1 although the light key's job is older
    tenants.job(heavy, JobStatus.running)  # 3/3 == 1/1: the oldest queued job of the two keys
    assert tenants.pick() == light_job


def test_batch_work_only_when_no_interactive_job_waits(settings):
    tenants = Tenants(settings)
    batcher, direct = tenants.key(), tenants.key()
    batch_job = tenants.job(batcher, batch=True)
    direct_job = tenants.job(direct)
    for _ in range(3):
        tenants.job(direct, JobStatus.running)
    assert tenants.pick() == direct_job  # the direct key runs more, but batch work waits for it
    with Session(tenants.engine) as session:
        session.get_one(Job, direct_job).status = JobStatus.running
        session.commit()
    assert tenants.pick() == batch_job


def test_a_batchs_lines_stored_together_run_in_file_order(settings):
    """A chunk of a batch's lines is one INSERT with one created_at (ponder/workers/batches.py); their
    random ids must not decide the order."""
    tenants = Tenants(settings)
    key = tenants.key()
    first = tenants.job(key, batch=True, batch_line=1)
    with Session(tenants.engine) as session:
        batch_id, created_at = session.get_one(Job, first).batch_id, session.get_one(Job, first).created_at
    assert batch_id is not None
    lines = [7, 3, 9, 2, 8, 5, 4, 6]
    ids = {tenants.job(key, batch=batch_id, batch_line=line, created_at=created_at): line for line in lines}
    ids[first] = 1
    picked = []
    for _ in ids:
        job_id = tenants.pick()
        assert job_id is not None
        picked.append(ids[job_id])
        with Session(tenants.engine) as session:
            session.get_one(Job, job_id).status = JobStatus.running
            session.commit()
    assert picked == sorted(ids.values())


def test_cancelled_and_expired_jobs_are_never_picked(settings):
    tenants = Tenants(settings)
    key = tenants.key()
    tenants.job(key, cancel_requested=True)
    expired = tenants.job(key)
    with Session(tenants.engine) as session:
        session.get_one(Job, expired).expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    assert tenants.pick() is None
    live = tenants.job(key)
    assert tenants.pick() == live


def test_a_message_takes_the_fair_pick_not_its_own_job(settings):
    tenants = Tenants(settings)
    flood, quiet = tenants.key(), tenants.key()
    tenants.job(flood, JobStatus.running)
    message_job = tenants.job(flood)
    quiet_job = tenants.job(quiet)
    admission = KvReservations(num_blocks=100, block_size=BLOCK, max_seqs=4, output_share=0.25)
    job, _ = job_runner.take_job(message_job, "worker-a", settings, admission)
    assert job.id == quiet_job and job.status == JobStatus.running
    assert admission.status() == {"admitted": 1, "reserved_blocks": Demand(3, 64).blocks(BLOCK, 0.25), "batch_lines": 0}


def test_within_the_picked_key_a_message_runs_its_own_job(settings):
    """So that a task in Flower is the job it names whenever fairness allows it."""
    tenants = Tenants(settings)
    key = tenants.key()
    jobs = [tenants.job(key) for _ in range(3)]
    job, _ = job_runner.take_job(jobs[2], "worker-a", settings, KvReservations(100, BLOCK, 4, 0.25))
    assert job.id == jobs[2]
    job, _ = job_runner.take_job(uuid.uuid4(), "worker-a", settings, KvReservations(100, BLOCK, 4, 0.25))
    assert job.id == jobs[0]  # a message whose job is gone: the oldest


def test_fifo_when_fair_scheduling_is_off(settings):
    tenants = Tenants(settings)
    flood, quiet = tenants.key(), tenants.key()
    tenants.job(flood, JobStatus.running)
    message_job = tenants.job(flood)
    tenants.job(quiet)
    fifo = settings.model_copy(update={"fair_scheduling": False})
    job, _ = job_runner.take_job(message_job, "worker-a", fifo, KvReservations(100, BLOCK, 4, 0.25))
    assert job.id == message_job


def test_a_job_the_engine_cannot_hold_stays_queued_and_its_message_goes_back(settings):
    tenants = Tenants(settings)
    key = tenants.key()
    big = tenants.job(key, prompt_token_ids=list(range(200)), max_tokens=400)  # 200 + 100 tokens: 19 blocks
    admission = KvReservations(num_blocks=24, block_size=BLOCK, max_seqs=4, output_share=0.25)
    other = admission.try_admit(Demand(prompt_tokens=96, max_tokens=0))  # 6 blocks held: 25 > 24
    queue = redis_lib.Redis.from_url(settings.redis_url)
    before = queue.llen(INFERENCE_QUEUE)
    waiting = settings.model_copy(update={"admission_wait_seconds": 0.2})
    outcome = job_runner.take_job(big, "worker-a", waiting, admission)
    assert isinstance(outcome, str) and outcome.startswith("passed on"), outcome
    with Session(tenants.engine) as session:
        assert session.get_one(Job, big).status == JobStatus.queued
    assert queue.llen(INFERENCE_QUEUE) == before + 1  # for a worker with room
    admission.release(other)
    job, _ = job_runner.take_job(big, "worker-a", waiting, admission)
    assert job.id == big


def test_admission_counts_blocks_and_slots():
    admission = KvReservations(num_blocks=10, block_size=BLOCK, max_seqs=2, output_share=0.5)
    # prompt 20 + half of 40 = 40 tokens: 3 blocks; two samples: 20 + 2 x 20 = 60: 4 blocks
    assert Demand(20, 40).blocks(BLOCK, 0.5) == 3 and Demand(20, 40, n=2).blocks(BLOCK, 0.5) == 4
    a = admission.try_admit(Demand(20, 40, n=2))
    assert a is not None
    assert admission.try_admit(Demand(100, 0)) is None  # 7 blocks: 4 + 7 > 10
    b = admission.try_admit(Demand(90, 0))  # 6 blocks: 4 + 6 == 10
    assert b is not None and b != a
    assert admission.try_admit(Demand(1, 0)) is None  # no slot left (max_seqs 2)
    admission.release(a)
    admission.release(a)  # twice: no effect
    assert admission.status() == {"admitted": 1, "reserved_blocks": 6, "batch_lines": 0}
    admission.release(b)
    assert admission.try_admit(Demand(10_000, 0)) is not None  # larger than the cache, into an empty engine
    assert admission.status() == {"admitted": 1, "reserved_blocks": 625, "batch_lines": 0}


def test_two_takers_of_the_same_job_hold_a_reservation_each():
    """Slots racing for one job each reserve; the loser's release leaves the winner's in place."""
    admission = KvReservations(num_blocks=10, block_size=BLOCK, max_seqs=8, output_share=0.0)
    winner = admission.try_admit(Demand(64, 0))
    loser = admission.try_admit(Demand(64, 0))
    assert winner is not None and loser is not None
    admission.release(loser)
    assert admission.status() == {"admitted": 1, "reserved_blocks": 4, "batch_lines": 0}
    assert admission.try_admit(Demand(112, 0)) is None  # 4 + 7 > 10: the winner's blocks still count


def test_admission_waits_for_a_release():
    admission = KvReservations(num_blocks=4, block_size=BLOCK, max_seqs=8, output_share=0.0)
    first = admission.try_admit(Demand(64, 0))
    assert first is not None
    threading.Timer(0.3, admission.release, args=[first]).start()
    started = time.monotonic()
    assert admission.admit_within(Demand(64, 0), seconds=30) is not None
    assert time.monotonic() - started < 29  # woken by the release, not by the timeout
    assert admission.admit_within(Demand(64, 0), seconds=0.1) is None


def test_a_batchs_lines_hold_at_most_their_share_of_the_slots_and_blocks():
    """Before: batch lines could hold every slot, and a direct job waited for one of them to end."""
    admission = KvReservations(num_blocks=20, block_size=BLOCK, max_seqs=4, output_share=0.0, batch_share=0.5)
    lines = [admission.try_admit(Demand(16, 0, batch=True)) for _ in range(3)]
    assert lines[0] is not None and lines[1] is not None and lines[2] is None  # 2 of 4 slots
    assert admission.try_admit(Demand(16, 0)) is not None  # a direct job: the slots kept for it
    admission.release(lines[0])
    assert admission.try_admit(Demand(16 * 10, 0, batch=True)) is None  # 1 + 10 blocks > half of 20
    assert admission.try_admit(Demand(16 * 9, 0, batch=True)) is not None  # 1 + 9 == 10
    assert admission.status() == {"admitted": 3, "reserved_blocks": 11, "batch_lines": 2}
    alone = KvReservations(num_blocks=20, block_size=BLOCK, max_seqs=4, output_share=0.0, batch_share=0.5)
    assert alone.try_admit(Demand(16 * 15, 0, batch=True)) is not None  # larger than the share: no other line


def test_a_batch_line_waiting_for_room_gives_way_to_a_direct_job(settings, monkeypatch):
    """A slot whose message picked a batch line, with the batch's share full, takes a direct job
    announced meanwhile at once; before, the line took the slot and the direct job waited for one
    of the batch's lines to end. The slot's own periodic look is put off here: the announcement
    alone must wake it."""
    monkeypatch.setattr(admission, "LOOK_EVERY_SECONDS", 600)
    tenants = Tenants(settings)
    batcher, direct = tenants.key(), tenants.key()
    line = tenants.job(batcher, batch=True)
    reservations = KvReservations(num_blocks=100, block_size=BLOCK, max_seqs=2, output_share=0.0, batch_share=0.5)
    assert reservations.try_admit(Demand(3, 0, batch=True)) is not None  # a line running: the share is full
    patient = settings.model_copy(update={"admission_wait_seconds": 600})
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(job_runner.take_job(line, "worker-a", patient, reservations)))
    taker.start()
    assert admission.bell_for(settings.redis_url).subscribed.wait(60)
    time.sleep(0.5)
    assert taker.is_alive()  # the line waits for room
    direct_job = tenants.job(direct)
    announce_direct_job(str(direct_job))  # as enqueue_job does after the message
    taker.join(timeout=60)  # not the admission wait, nor the periodic look: the announcement
    assert not taker.is_alive()
    ((job, _),) = taken
    assert job.id == direct_job and job.status == JobStatus.running
    with Session(tenants.engine) as session:
        assert session.get_one(Job, line).status == JobStatus.queued  # for the next slot


def test_a_slot_kept_for_direct_jobs_takes_the_next_one_in_the_task_it_ended_a_job_in(settings, monkeypatch):
    """Before: a slot went back through Celery after each job (its ack, then its next message),
    10-30 ms in which a direct job submitted meanwhile waited for a slot between two of a running
    batch's lines. A slot beyond the batch share now waits for it in the same task. The periodic
    look is put off: the announcement alone must wake it."""
    monkeypatch.setattr(admission, "LOOK_EVERY_SECONDS", 600)
    monkeypatch.setattr(admission, "_DIRECT_JOB_READY", admission.SharedLook(600))  # no look an earlier test shared
    tenants = Tenants(settings)
    batcher, direct = tenants.key(), tenants.key()
    reservations = KvReservations(num_blocks=100, block_size=BLOCK, max_seqs=2, output_share=0.0, batch_share=0.5)
    assert admission.next_direct_job("worker-a", settings, reservations) is None  # no batch runs: nobody is kept
    assert reservations.try_admit(Demand(3, 0, batch=True)) is not None  # a line runs: one slot is kept
    patient = settings.model_copy(update={"admission_wait_seconds": 600})
    kept: list = []
    keeper = threading.Thread(target=lambda: kept.append(admission.next_direct_job("worker-a", patient, reservations)))
    keeper.start()
    assert admission.bell_for(settings.redis_url).subscribed.wait(60)
    time.sleep(0.5)
    assert keeper.is_alive() and not reservations.start_keeping()  # it waits, and is the one slot kept
    line = tenants.job(batcher, batch=True)  # a line queued meanwhile is not what it waits for,
    announce_direct_job(str(line))  # nor a ring whose pick finds none (one channel per Redis: other databases ring)
    time.sleep(0.5)
    assert keeper.is_alive()
    direct_job = tenants.job(direct)
    announce_direct_job(str(direct_job))  # as enqueue_job does, before the message
    keeper.join(timeout=60)  # not the admission wait, nor the periodic look: the announcement
    assert not keeper.is_alive()
    ((job, reservation),) = kept
    assert job.id == direct_job and job.status == JobStatus.running and job.worker == "worker-a"
    assert reservations.status() == {"admitted": 2, "reserved_blocks": 2, "batch_lines": 1}


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_output_share_reserves_between_the_prompt_and_every_max_token(share):
    assert Demand(16, 64).blocks(BLOCK, share) == (1 if share == 0 else 5)


def test_maintenance_sends_only_the_messages_the_queue_lacks(settings):
    """A message stands for a slot: three stale queued jobs and one message waiting -> two sent
    (the oldest jobs'), and none on the next round."""
    tenants = Tenants(settings)
    key = tenants.key()
    jobs = [tenants.job(key) for _ in range(3)]
    with Session(tenants.engine) as session:
        for job_id in jobs:
            session.get_one(Job, job_id).updated_at = utcnow() - timedelta(hours=1)
        session.commit()
    queue = redis_lib.Redis.from_url(settings.redis_url)
    queue.delete(INFERENCE_QUEUE)
    enqueue_job(str(jobs[2]))
    assert maintenance.requeue_expired_leases(settings, lambda worker: True, list)["resent"] == 2
    assert queue.llen(INFERENCE_QUEUE) == 3
    sent = [json.loads(message)["headers"]["id"] for message in queue.lrange(INFERENCE_QUEUE, 0, -1)]
    assert sorted(sent) == sorted(str(job_id) for job_id in jobs)
    assert maintenance.requeue_expired_leases(settings, lambda worker: True, list)["resent"] == 0


def test_running_work_is_counted_in_samples(settings):
    """A job of n samples fills n slots of an engine: it weighs n in the fair pick (it weighed one)."""
    tenants = Tenants(settings)
    wide, narrow = tenants.key(), tenants.key()
    tenants.job(wide, JobStatus.running, request={"prompt": "x", "max_tokens": 64, "n": 8})
    for _ in range(3):
        tenants.job(narrow, JobStatus.running)
    wide_job = tenants.job(wide)
    narrow_job = tenants.job(narrow)
    assert tenants.pick() == narrow_job  # 3 running samples < 8, although the wide key's job is older
    for _ in range(5):
        tenants.job(narrow, JobStatus.running)  # 8 == 8: the oldest queued job of the two
    assert tenants.pick() == wide_job


@pytest.fixture
def sqlite_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(url)
    yield Settings(database_url=url)
    database_engine(url).dispose()


def test_a_pick_seeks_the_jobs_it_weighs_and_never_scans_the_queued_lines(sqlite_settings):
    """Before: each pick read every queued job, a batch's 50,000 lines among them (~100 ms of a core
    a pick, at every slot's take: direct jobs waited and the API's answers slowed while a batch
    ran); SQLite's planner, which has no statistics, took the deadline's range index
    (ix_jobs_status_expires). Every query a pick makes must seek by class, key or batch."""
    tenants = Tenants(sqlite_settings)
    batcher, direct = tenants.key(), tenants.key()
    first_line = tenants.job(batcher, batch=True, batch_line=0)
    with Session(tenants.engine) as session:
        template = session.get_one(Job, first_line).model_dump(exclude={"id", "batch_line"})
        session.execute(insert(Job), [template | {"id": uuid.uuid4(), "batch_line": i} for i in range(1, 2000)])
        session.commit()
    direct_job = tenants.job(direct)
    statements: list[tuple[str, object]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(tenants.engine, "before_cursor_execute", remember)
    try:
        assert tenants.pick() == direct_job
        with Session(tenants.engine) as session:
            session.get_one(Job, direct_job).status = JobStatus.running
            session.commit()
        assert tenants.pick() == first_line
    finally:
        event.remove(tenants.engine, "before_cursor_execute", remember)
    with tenants.engine.connect() as connection:
        plans = [
            " | ".join(row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all())
            for sql, params in statements
        ]
    reads_jobs = [plan for plan in plans if " jobs" in plan]
    assert len(reads_jobs) >= 4, plans  # the direct pick's queries and the batch line's
    for plan in reads_jobs:
        assert "SCAN jobs" not in plan and "ix_jobs_status_expires" not in plan, plan
