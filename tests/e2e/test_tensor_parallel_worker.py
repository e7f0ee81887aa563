"""A job through the real stack on an inference worker whose engine spans two tensor-parallel
ranks (gloo on CPU): the worker process spawns its second rank, and the job's text equals what one
rank generates offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ponder.service.prompts import prompt_token_ids
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from tests.e2e.test_jobs import offline_params, submit
from tests.stack import database, make_stack, start_redis, wait_final


def spawned_ranks(pid: int) -> list[int]:
    """The children of a process that multiprocessing spawned to run code (not its resource
    tracker), from /proc (Linux)."""
    ranks = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in command and b"resource_tracker" not in command:
                ranks.append(int(child))
    return ranks


@pytest.mark.slow
def test_a_job_on_a_two_rank_worker(tmp_path, make_llm):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("reading a worker's child processes needs /proc (Linux)")
    # A Redis database of its own: the session stack's worker (tests/e2e/conftest.py) would take our jobs.
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1)
    with database("sqlite", tmp_path) as database_url:
        stack = make_stack(tmp_path, database_url, redis_url, tensor_parallel_size=2, max_num_seqs=4)
        stack.start("api")
        stack.start("worker")
        try:
            stack.wait_ready()
            assert len(spawned_ranks(stack.processes["worker"].pid)) == 1, "the worker did not spawn its rank 1"
            body = {"prompt": "The tensor-parallel worker writes", "max_tokens": 24, "temperature": 0}
            with stack.client() as client:
                job = wait_final(client, submit(client, body)["id"])
        finally:
            stack.stop_all()
            if redis_process is not None:
                redis_process.terminate()
    assert job["status"] == "succeeded", job
    prompt = prompt_token_ids(JobCreate(**body), Settings(model="tiny-llama", _env_file=None))
    one_rank = make_llm("tiny-llama").generate([prompt], offline_params(body))[0]
    assert job["content"] == one_rank.content and job["finish_reason"] == one_rank.finish_reason
    assert job["usage"]["completion_tokens"] == one_rank.usage.completion_tokens
