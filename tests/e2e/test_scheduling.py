"""Scheduling through real processes: a key that floods the queue does not starve another key
(fair pick, ponder/workers/job_picker.py), and a worker whose engine cannot hold a job leaves it queued
for a worker that can (admission, ponder/workers/kv_reservations.py)."""

from __future__ import annotations

import itertools
import os
from datetime import datetime

from ponder.cli.devstack import start_private_redis
from tests.stack import make_stack, ponder, wait_final, wait_until

FLOOD = 40
HANDED_BACK = "passed on: the engine cannot hold"  # ponder/workers/job_runner.py take_job's log


def test_a_flood_from_one_key_does_not_starve_another(stack):
    """Key A queues 40 long jobs, then key B two short ones: B's finish while at least half of A's
    are still queued (first come first served would run every A job before B's)."""
    other_key = ponder(["keys", "create", "--name", "fair-b"], stack.env).stdout.strip().splitlines()[-1]
    with stack.client() as a, stack.client(other_key) as b:
        body = {"prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0}
        flood = [a.post("/v1/jobs", json=body).json()["id"] for _ in range(FLOOD)]
        short = [b.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}).json()["id"] for _ in range(2)]
        done = [wait_final(b, job_id) for job_id in short]
        statuses = [a.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in flood]
        for job_id in flood:  # the rest is not needed: cancelling keeps the suite short
            a.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in flood:
            wait_final(a, job_id)
    assert [job["status"] for job in done] == ["succeeded"] * 2
    assert statuses.count("queued") >= FLOOD // 2, statuses


def test_a_worker_whose_engine_is_full_leaves_jobs_to_one_with_room(tmp_path):
    """Worker S can hold one job's KV at a time (its whole max tokens reserved). Four jobs are
    queued while S is alone: it runs one and hands back the messages it cannot serve (no job waits
    inside its full engine, marked running). Worker L starts, and four more jobs come: L runs what
    S cannot hold. S never runs two jobs at once; every job succeeds."""
    redis_url, redis_process = start_private_redis(tmp_path / "redis", persistent=False)
    stack = make_stack(tmp_path, f"sqlite:///{tmp_path / 'ponder.db'}", redis_url, maintenance_interval_seconds=1)
    try:
        for name in ("api", "beat"):
            stack.start(name)
        stack.wait_api()
        # 17 prompt + 400 output tokens: 27 blocks of 16; 40 blocks hold one such job, not two
        stack.start("worker", label="worker-s", num_kv_blocks=40, admission_output_share=1)
        stack.wait_workers(1)
        with stack.client() as client:
            body = {"prompt": "Tell me a story.", "max_tokens": 400, "temperature": 0}
            jobs = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(4)]
            # S alone, busy with one job, receives the others' messages: it hands them back
            wait_until(lambda: HANDED_BACK in stack.log("worker-s"), 120, "worker S handing a message back")
            # S may finish all four before L is up on a fast machine: L's share comes after it is
            stack.start("worker", label="worker-l")
            stack.wait_workers(2)  # L's engine is loaded (it beats); its Celery consumer comes after:
            wait_until(lambda: " ready." in stack.log("worker-l"), 300, "worker L consuming")
            jobs += [client.post("/v1/jobs", json=body).json()["id"] for _ in range(4)]
            finals = [wait_final(client, job_id) for job_id in jobs]
            ran_on = {job["id"]: stack.worker_of(job["id"]) for job in finals}
        small, large = _worker_of_label(stack, "worker-s"), _worker_of_label(stack, "worker-l")
    finally:
        stack.stop_all()
        redis_process.terminate()
    assert [job["status"] for job in finals] == ["succeeded"] * len(finals)
    on_small = sorted(_interval(job) for job in finals if ran_on[job["id"]] == small)
    assert on_small and len(on_small) < len(finals), on_small
    assert set(ran_on.values()) == {small, large}
    for first, second in itertools.combinations(on_small, 2):
        assert first[1] <= second[0], f"worker S ran two jobs at once: {on_small}"


def _interval(job: dict) -> tuple[datetime, datetime]:
    timings = job["timings"]
    return datetime.fromisoformat(timings["started_at"]), datetime.fromisoformat(timings["finished_at"])


def _worker_of_label(stack, label: str) -> str:
    """The `worker` name jobs carry (inference@host:pid) of the process started as `label`."""
    return f"inference@{os.uname().nodename}:{stack.processes[label].pid}"
