"""The fault run of benchmarks/faults.py, small: seeded jobs on two inference workers while one
worker is SIGKILLed (a replacement starts), Redis is killed with SIGKILL and restarted from its
AOF, and the worker then running the jobs is SIGTERMed. No job is lost, each ends with the text of
its undisturbed run, each resumed from a checkpoint, none got two final webhook events, and the
tokens thrown away stay within what the workers generate between two progress flushes."""

from __future__ import annotations

from benchmarks.faults import run_faults

JOBS = 4
# Long enough that every job is still running at the last fault (the drain, at half of it) on a fast
# machine: the other half is ~500 steps (a slow one only makes them run longer). 1,500 spent a third
# more of the suite's time on the same faults.
MAX_TOKENS = 1000


def test_no_job_is_lost_or_finished_twice_through_a_worker_kill_a_redis_restart_and_a_drain(tmp_path):
    run = run_faults(tmp_path, f"sqlite:///{tmp_path / 'ponder.db'}", JOBS, MAX_TOKENS, resume=True)
    assert (run.succeeded, run.lost, run.identical) == (JOBS, 0, JOBS), run
    assert run.final_events == 1, run
    assert run.resumed == JOBS, run
    # Only the SIGKILL throws generated tokens away (a drain checkpoints everything first): what
    # its jobs generated since their last progress flush. Starting over would throw away a
    # quarter of every job at the kill and half at the drain.
    assert run.wasted_tokens <= 2 * run.interval_tokens + JOBS, run
    assert run.wasted_tokens < run.completion_tokens / 10, run
