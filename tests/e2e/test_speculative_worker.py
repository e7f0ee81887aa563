"""A job on an inference worker that decodes speculatively (tiny-r1-mtp's MTP layer drafts, about
half of them right): the job's draft counts reach its usage, /v1/usage and the worker's counters."""

from __future__ import annotations

import os

import pytest

from ponder.cli.devstack import free_port
from tests.e2e.test_jobs import submit
from tests.e2e.test_operations import scrape, value, worker_metrics_url
from tests.stack import database, make_stack, start_redis, wait_final


@pytest.mark.slow
def test_a_speculative_workers_job_reports_its_drafts(tmp_path):
    # A Redis database of its own: the session stack's worker (tests/e2e/conftest.py) would take our jobs.
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 2)
    with database("sqlite", tmp_path) as database_url:
        stack = make_stack(
            tmp_path,
            database_url,
            redis_url,
            model="tiny-r1-mtp",
            num_speculative_tokens=1,  # on the CPU speculation is off unless asked for
            worker_metrics_port=free_port(),
        )
        stack.start("api")
        stack.start("worker")
        try:
            stack.wait_ready()
            body = {"prompt": "The speculative worker writes", "max_tokens": 24, "temperature": 0}
            with stack.client() as client:
                job = wait_final(client, submit(client, body)["id"])
                (row,) = client.get("/v1/usage").json()["data"]
            samples = scrape(worker_metrics_url(stack))  # a fresh worker: its totals are this job's
        finally:
            stack.stop_all()
            if redis_process is not None:
                redis_process.terminate()
    assert job["status"] == "succeeded", job
    usage = job["usage"]
    drafted, accepted = usage["draft_tokens"], usage["accepted_draft_tokens"]
    assert 0 < accepted < drafted, usage
    assert usage["draft_acceptance_rate"] == accepted / drafted
    assert (row["draft_tokens"], row["accepted_draft_tokens"]) == (drafted, accepted)
    assert value(samples, "ponder_engine_spec_decode_draft_tokens_total") == drafted
    assert value(samples, "ponder_engine_spec_decode_accepted_tokens_total") == accepted
