"""Rate limits per API key on the real stack, served by two more API processes on its database and
Redis (so the counters are shown to be shared, not per process), with a "minute" of 3 s and a
"day" of 6 s (PONDER_RATE_LIMIT_WINDOW_SECONDS / PONDER_RATE_LIMIT_DAY_SECONDS, which only tests
shorten): a key over its requests per minute gets 429 with Retry-After and OpenAI's x-ratelimit
headers from either process; the official `openai` SDK, retrying on its own, rides a small limit
out; a key over its daily tokens is refused until the day rolls; the worker settles a job's
reservation to what it used."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
from openai import OpenAI

from ponder.cli.devstack import free_port
from tests.stack import SQLITE_ONLY, ponder, wait_final

pytestmark = SQLITE_ONLY  # nothing here depends on the database (tests/stack.py)

MINUTE, DAY = 3, 6
JOB = {"prompt": "ping", "max_tokens": 2, "seed": 1}
HEADERS = ("limit", "remaining", "reset")


@pytest.fixture(scope="module")
def apis(stack):
    """Two API processes with the short windows; (base URL, base URL)."""
    urls = []
    for label in ("rl-api-1", "rl-api-2"):
        port = free_port()
        stack.start(
            "api",
            label=label,
            api_port=str(port),
            rate_limit_window_seconds=str(MINUTE),
            rate_limit_day_seconds=str(DAY),
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            _wait_healthy(url)
        yield urls
    finally:
        for label in ("rl-api-1", "rl-api-2"):
            stack.kill(label)


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


def create_key(stack, *flags: str) -> tuple[str, str]:
    """`ponder keys create` with limit flags: (key id, key)."""
    result = ponder(["keys", "create", "--name", "limited", *flags], stack.env)
    assert result.returncode == 0, result.stderr
    key_id = re.search(r"created key ([0-9a-f-]{36})", result.stdout + result.stderr)
    assert key_id, result.stdout + result.stderr
    return key_id.group(1), result.stdout.strip().splitlines()[-1]


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def seconds(reset: str) -> float:
    """OpenAI's reset durations as Ponder writes them (20ms, 1.5s)."""
    return float(reset.removesuffix("ms")) / 1000 if reset.endswith("ms") else float(reset.removesuffix("s"))


def until_a_fresh_window(response: httpx.Response, kind: str, at_least: float) -> bool:
    """Sleeps past the window's end when less than `at_least` seconds of it are left (True then)."""
    left = seconds(response.headers[f"x-ratelimit-reset-{kind}"])
    if left >= at_least:
        return False
    time.sleep(left + 0.05)
    return True


def test_requests_over_the_limit_get_429_from_either_process(stack, apis):
    _, key = create_key(stack, "--requests-per-minute", "4")
    first, second = client(apis[0], key), client(apis[1], key)
    # start at the beginning of a window, so that the burst below fits in it
    probe = first.post("/v1/jobs", json=JOB)
    assert probe.status_code == 202, probe.text
    time.sleep(seconds(probe.headers["x-ratelimit-reset-requests"]) + 0.05)
    answers = [c.post("/v1/jobs", json=JOB) for c in (first, second, first, second, first, second)]
    assert [a.status_code for a in answers] == [202, 202, 202, 202, 429, 429], [a.text for a in answers]
    # one count for both processes: the remaining requests go down across them
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["3", "2", "1", "0", "0", "0"]
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "4"
        assert 0 < seconds(answer.headers["x-ratelimit-reset-requests"]) <= MINUTE
    refused = answers[-1]
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= MINUTE * 1000 and int(refused.headers["retry-after"]) == -(-wait_ms // 1000)
    time.sleep(wait_ms / 1000 + 0.05)
    again = second.post("/v1/jobs", json=JOB)
    assert again.status_code == 202 and again.headers["x-ratelimit-remaining-requests"] == "3"
    # every job-creating route counts: chat completions, responses and batches too
    time.sleep(seconds(again.headers["x-ratelimit-reset-requests"]) + 0.05)
    for _ in range(4):
        assert first.post("/v1/jobs", json=JOB).status_code == 202
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/responses", {"model": "tiny-llama", "input": "hi", "background": True}),
        ("/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    ):
        refused = second.post(path, json=body)
        assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0", path
        assert refused.json()["error"]["type"] == "rate_limit_error"
    # keys of no limits answer no rate-limit headers
    unlimited = client(apis[0], stack.api_key).post("/v1/jobs", json=JOB)
    assert unlimited.status_code == 202 and not any(h.startswith("x-ratelimit") for h in unlimited.headers)


def test_the_openai_sdk_retries_through_a_small_limit(stack, apis):
    _, key = create_key(stack, "--requests-per-minute", "2")
    statuses: list[int] = []
    http_client = httpx.Client(event_hooks={"response": [lambda response: statuses.append(response.status_code)]})
    sdk = OpenAI(base_url=f"{apis[1]}/v1", api_key=key, max_retries=4, timeout=120, http_client=http_client)
    started = time.monotonic()
    try:
        completions = [
            sdk.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=2, seed=i
            )
            for i in range(5)
        ]
    finally:
        sdk.close()
    assert [c.choices[0].finish_reason for c in completions] == ["length"] * 5
    assert statuses.count(200) == 5 and 429 in statuses, statuses  # refused, then let through
    assert set(statuses) == {200, 429}
    # 5 requests at 2 per window: at least two windows had to pass
    assert time.monotonic() - started >= MINUTE


def test_daily_tokens_refuse_until_the_day_rolls_and_jobs_settle(stack, apis):
    # the prompt's size in tokens (the same for every key)
    prompt_tokens = client(apis[0], stack.api_key).post("/v1/jobs", json=JOB).json()["usage"]["prompt_tokens"]
    day_limit = prompt_tokens + 32
    key_id, key = create_key(stack, "--tokens-per-day", str(day_limit))
    api = client(apis[0], key)
    redis = stack.redis
    full = {**JOB, "max_tokens": 32}  # prompt + max tokens: the whole day
    for _ in range(3):
        first = api.post("/v1/jobs", json=full)
        assert first.status_code == 202, first.text
        assert first.headers["x-ratelimit-limit-tokens"] == str(day_limit)
        assert first.headers["x-ratelimit-remaining-tokens"] == "0"
        if not until_a_fresh_window(first, "tokens", at_least=2):
            break
    job_id = first.json()["id"]
    reservation = f"ponder:rl:job:{job_id}"
    day_counter = redis.hget(reservation, "tpd")
    # whatever the first job ends up using, the day has no room for another whole one
    refused = api.post("/v1/jobs", json=full)
    refused_at = time.monotonic()
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "tokens per day" in error["message"]
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= DAY * 1000 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # the worker settles the job to what it used: its reservation goes, the day counts its usage
    done = wait_final(api, job_id)
    used = done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    deadline = time.monotonic() + 30
    while redis.exists(reservation) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not redis.exists(reservation), "the worker did not settle the job"
    counted = redis.get(day_counter)
    assert counted is None or int(counted) == used  # (None: the day rolled meanwhile)
    time.sleep(max(refused_at + wait_ms / 1000 + 0.05 - time.monotonic(), 0))  # the day has rolled
    again = api.post("/v1/jobs", json=full)
    assert again.status_code == 202, again.text
    assert key_id in redis.hget(f"ponder:rl:job:{again.json()['id']}", "tpd")


def test_jobs_at_once_free_up_when_a_job_ends(stack, apis):
    _, key = create_key(stack, "--max-concurrent-jobs", "1")
    first, second = client(apis[0], key), client(apis[1], key)
    long_job = {**JOB, "max_tokens": 1000}
    running = first.post("/v1/jobs", json=long_job)
    assert running.status_code == 202, running.text
    refused = second.post("/v1/jobs", json=JOB)  # the other process sees the same live job
    assert refused.status_code == 429, refused.text
    assert "1 queued or running" in refused.json()["error"]["message"]
    assert refused.headers["retry-after-ms"] == "1000"
    job_id = running.json()["id"]
    assert first.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    wait_final(first, job_id)
    deadline = time.monotonic() + 30  # the worker settles right after its final write
    while (admitted := second.post("/v1/jobs", json=JOB)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admitted.status_code == 202, admitted.text


def test_redeliveries_count_against_requests_per_minute(stack, apis):
    """A redelivery sends a webhook attempt: it was the one work-making route no limit counted."""
    _, key = create_key(stack, "--requests-per-minute", "2")
    with client(apis[0], key) as api:
        answers = [api.post(f"/v1/deliveries/{uuid.uuid4()}/redeliver") for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429], [a.text for a in answers]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in answers[2].headers
