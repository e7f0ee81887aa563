"""Self-consistency through the real stack: a job with n samples comes back with every sample, the
vote over their answers (ponder/workers/vote.py, in the worker) and usage summed over the samples with the
prompt counted once; `ponder submit --n ... --wait` shows the vote. (tiny-llama's random weights
rarely write a `\\boxed{}`: the vote's content is checked for consistency with the samples here;
tests/workers/test_vote.py and test_early_stop.py check what it decides on scripted answers.)"""

from __future__ import annotations

from tests.e2e.test_cli_client import client_env
from tests.stack import ponder, wait_final


def test_a_job_with_six_samples_is_voted(stack):
    body = {"prompt": "What is 6*7?", "math": True, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    with stack.client() as client:
        created = client.post("/v1/jobs", json=body | {"n": 6, "vote": {"early_stop": True}})
        assert created.status_code == 202, created.text
        single = client.post("/v1/jobs", json=body | {"max_tokens": 1})
        job, single = wait_final(client, created.json()["id"]), wait_final(client, single.json()["id"])
        refused = client.post("/v1/jobs", json=body | {"vote": {"early_stop": True}})  # n = 1: nothing to vote on
    assert refused.status_code == 422 and "n > 1" in refused.text, refused.text
    assert job["status"] == "succeeded", job
    samples, vote = job["samples"], job["vote"]
    assert [s["index"] for s in samples] == list(range(6))
    assert job["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples) > 0
    assert job["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"] > 0  # the prompt once
    assert vote["n"] == 6 and job["answer"] == vote["answer"]
    voted = sorted([i for g in vote["groups"] for i in g["samples"]] + vote["unparsed"])
    stopped = [s["index"] for s in samples if s["finish_reason"] == "abort"]
    assert voted == sorted(set(range(6)) - set(stopped))  # every finished sample counted once
    assert job["stopped_early"] == bool(stopped)
    assert all(s["index"] in vote["unparsed"] for s in samples if s["answer"] is None and s["index"] not in stopped)
    assert vote["count"] == (vote["groups"][0]["count"] if vote["groups"] else 0)
    assert vote["agreement"] == vote["count"] / 6

    result = ponder(["submit", "What is 6*7?", "--n", "3", "--math", "--max-tokens", "8", "--wait"], client_env(stack))
    assert result.returncode == 0, result.stderr
    assert "vote: " in result.stdout and "/3, agreement" in result.stdout, result.stdout
