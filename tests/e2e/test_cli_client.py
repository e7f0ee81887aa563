"""`ponder submit`, `ponder jobs ...`: the command-line client against the running stack."""

from __future__ import annotations

import json
import re

from tests.stack import SQLITE_ONLY, ponder

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)


def client_env(stack) -> dict:
    return {**stack.env, "PONDER_API_URL": stack.base_url, "PONDER_API_KEY": stack.api_key, "COLUMNS": "250"}


def test_submit_wait_streams_the_answer(stack):
    env = client_env(stack)
    result = ponder(["submit", "What is 2+2?", "--wait", "--max-tokens", "24", "--seed", "3"], env)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"job ([0-9a-f-]{36})", result.stderr + result.stdout).group(1)
    assert "succeeded" in result.stdout and "completion_tokens" in result.stdout

    shown = ponder(["jobs", "show", job_id], env)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] > 0

    listed = ponder(["jobs", "list", "--limit", "50"], env)
    assert listed.returncode == 0 and job_id in listed.stdout

    cancel = ponder(["jobs", "cancel", job_id], env)
    assert cancel.returncode == 2 and cancel.stderr.startswith("error: 409")


def test_client_errors_are_one_line(stack):
    env = client_env(stack) | {"PONDER_API_KEY": "pdr_wrong"}
    result = ponder(["jobs", "list"], env)
    assert result.returncode == 2 and result.stderr.startswith("error: 401") and "Traceback" not in result.stderr
    unreachable = client_env(stack) | {"PONDER_API_URL": "http://127.0.0.1:9"}
    result = ponder(["submit", "hello"], unreachable)
    assert result.returncode == 2 and "cannot reach the API" in result.stderr
