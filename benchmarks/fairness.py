"""Fairness between keys: key A queues a flood of long jobs, then key B submits a few short ones,
on one inference worker with 4 slots; how long B's jobs wait in the queue (created -> started),
with the fair pick (ponder/workers/job_picker.py) and, in the same run on a fresh stack, first come first
served (PONDER_FAIR_SCHEDULING=0: each message runs the job it names).

The real stack (uvicorn API, one Celery inference worker on tiny-llama, beat, a private Redis,
SQLite). tiny-llama's greedy output never ends early, so every A job runs its whole max tokens.

    python benchmarks/fairness.py [--flood 40] [--short 2] [--max-tokens 300]

prints `RESULT fairness b_wait_fair_s=... b_wait_fifo_s=... ratio=... a_queued_when_b_done_fair=...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ponder.cli.devstack import start_private_redis  # noqa: E402
from tests.stack import make_stack, ponder, wait_final  # noqa: E402

SLOTS = 4


@dataclass
class Outcome:
    b_waits: list[float]  # seconds each of B's jobs waited in the queue
    a_queued_when_b_done: int  # A's jobs still queued when B's last job ended
    a_job_seconds: float  # one A job's run time (median): the bound on B's wait on a free worker


def run(workdir: Path, fair: bool, flood: int, short: int, max_tokens: int) -> Outcome:
    redis_url, redis_process = start_private_redis(workdir / "redis", persistent=False)
    stack = make_stack(
        workdir,
        f"sqlite:///{workdir / 'ponder.db'}",
        redis_url,
        max_num_seqs=SLOTS,
        fair_scheduling=str(fair).lower(),
        maintenance_interval_seconds=1,
    )
    try:
        for name in ("api", "beat", "worker"):
            stack.start(name)
        stack.wait_ready()
        stack.wait_workers(1)
        other = ponder(["keys", "create", "--name", "b"], stack.env).stdout.strip().splitlines()[-1]
        with stack.client() as a, stack.client(other) as b:
            body = {"prompt": "Tell me a long story.", "max_tokens": max_tokens, "temperature": 0}
            flood_ids = [a.post("/v1/jobs", json=body).json()["id"] for _ in range(flood)]
            short_ids = [b.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}).json()["id"] for _ in range(short)]
            b_jobs = [wait_final(b, job_id, timeout=1800) for job_id in short_ids]
            a_queued = sum(a.get(f"/v1/jobs/{job_id}").json()["status"] == "queued" for job_id in flood_ids)
            a_jobs = [wait_final(a, job_id, timeout=1800) for job_id in flood_ids]
    finally:
        stack.stop_all()
        redis_process.terminate()
    assert all(job["status"] == "succeeded" for job in b_jobs + a_jobs)
    a_seconds = statistics.median(_seconds(job, "started_at", "finished_at") for job in a_jobs)
    return Outcome([_seconds(job, "created_at", "started_at") for job in b_jobs], a_queued, a_seconds)


def _seconds(job: dict, start: str, end: str) -> float:
    timings = job["timings"]
    return (datetime.fromisoformat(timings[end]) - datetime.fromisoformat(timings[start])).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=40, help="key A's long jobs")
    parser.add_argument("--short", type=int, default=2, help="key B's short jobs, submitted after A's")
    parser.add_argument("--max-tokens", type=int, default=300, help="each of A's jobs")
    args = parser.parse_args()
    results = {}
    for fair in (True, False):
        with tempfile.TemporaryDirectory(prefix="ponder-fairness-") as workdir:
            started = time.monotonic()
            results[fair] = run(Path(workdir), fair, args.flood, args.short, args.max_tokens)
            print(f"{'fair' if fair else 'fifo'}: {results[fair]} ({time.monotonic() - started:.0f} s)", flush=True)
    fair, fifo = results[True], results[False]
    print(
        f"RESULT fairness flood={args.flood} short={args.short} slots={SLOTS} "
        f"b_wait_fair_s={max(fair.b_waits):.2f} b_wait_fifo_s={max(fifo.b_waits):.2f} "
        f"ratio={max(fifo.b_waits) / max(max(fair.b_waits), 1e-3):.1f} "
        f"a_job_s={fair.a_job_seconds:.2f} a_queued_when_b_done_fair={fair.a_queued_when_b_done} "
        f"a_queued_when_b_done_fifo={fifo.a_queued_when_b_done}"
    )


if __name__ == "__main__":
    main()
