"""The operators' view on the real stack: Prometheus metrics of the API and of the inference
worker, Flower (its API and, in headless Chromium, its pages), and a canary prompt that must stay in
the database: no Redis key or message, no Flower response and no log line carries it."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import signal
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import Session, col, select

from ponder.service.db import database_engine
from ponder.service.tables import Job
from tests.e2e.test_jobs import running_with_output, submit
from tests.stack import SQLITE_ONLY, wait_final

CHROMIUM = "/usr/bin/chromium"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels); the page must parse."""
    response = httpx.get(url, timeout=30)  # no API key: operators scrape it as it is
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def worker_metrics_url(stack) -> str:
    return f"http://127.0.0.1:{stack.env['PONDER_WORKER_METRICS_PORT']}/metrics"


def wait_worker_idle(stack, timeout: float = 60) -> dict:
    """Nothing in the engine (jobs of earlier tests finished): the counters' baseline is stable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = scrape(worker_metrics_url(stack))
        busy = sum(
            value(samples, name) for name in ("ponder_engine_requests_running", "ponder_engine_requests_waiting")
        )
        queued = stack.redis.llen("inference")  # a job of an earlier test may still be on its way
        if busy == 0 and value(samples, "ponder_worker_jobs_in_flight") == 0 and queued == 0:
            return samples
        time.sleep(0.2)
    raise AssertionError("the worker never went idle")


@dataclass
class Ran:
    jobs: list[dict]
    canary: str
    canary_job: dict
    redis_while_running: list[bytes]
    flower_while_running: dict  # Flower's view of the canary job's task while it ran
    before: dict


@pytest.fixture(scope="module")
def ran(stack) -> Ran:
    """A few jobs through the stack, one of them holding a canary in its prompt (scanned in Redis
    while it runs, when its message sits in the broker's unacked set)."""
    before = wait_worker_idle(stack)
    canary = f"canary-{uuid.uuid4().hex}"
    with stack.client() as client:
        # Greedy on tiny-llama never meets EOS: a few seconds of running to look at (Flower sees
        # task events about a second late).
        canary_body = {"prompt": f"Remember {canary} and go on", "max_tokens": 1900, "temperature": 0}
        canary_job = submit(client, canary_body)
        bodies = [{"prompt": f"ops question {i}", "max_tokens": 8 + 4 * i, "seed": i} for i in range(3)]
        others = [submit(client, body) for body in bodies]
        ended_unseen = []  # on a busy machine a canary may run to its end between two looks: another then
        while running_with_output(client, canary_job["id"]) is None:
            ended_unseen.append(canary_job)
            assert len(ended_unseen) < 3, "three canary jobs ended before they were seen running"
            canary_job = submit(client, canary_body)
        while_running = redis_dump(stack)
        flower_view = flower_task_while_running(stack, client, canary_job["id"])
        jobs = [wait_final(client, job["id"]) for job in [canary_job, *ended_unseen, *others]]
    assert [job["status"] for job in jobs] == ["succeeded"] * len(jobs)
    return Ran(jobs, canary, jobs[0], while_running, flower_view, before)


def flower_task_while_running(stack, client: httpx.Client, job_id: str) -> dict:
    """Flower's view of the running job's task. The worker is paused meanwhile (its task-started
    event has gone out: the job has output): on a machine fast enough, the job otherwise ended
    before Flower, a second or so behind the events, had shown it running."""
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    worker = stack.processes["worker"]
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        with stack.flower() as flower:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                task = flower.get(f"/api/task/info/{job_id}")
                if task.status_code == 200 and task.json()["state"] == "STARTED":
                    return task.json()
                time.sleep(0.1)
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    return {}


def test_worker_metrics_count_what_the_jobs_used(stack, ran):
    after = wait_worker_idle(stack)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(ran.before, name, **labels)

    usage = [job["usage"] for job in ran.jobs]
    assert {stack.worker_of(job["id"]) for job in ran.jobs} == {value_label(after, "ponder_worker_info", "worker")}
    # Every output token is reported once, so the counter grows by exactly the completion tokens.
    assert grew("ponder_engine_decode_tokens_total") == sum(u["completion_tokens"] for u in usage)
    # Drafts likewise (none on tiny-llama: tests/e2e/test_speculative_worker.py has a model that drafts).
    assert grew("ponder_engine_spec_decode_draft_tokens_total") == sum(u["draft_tokens"] for u in usage)
    assert grew("ponder_engine_spec_decode_accepted_tokens_total") == sum(u["accepted_draft_tokens"] for u in usage)
    if grew("ponder_engine_preemptions_total") == 0:  # else recomputation adds prefill work
        assert grew("ponder_engine_prefill_tokens_total") == sum(u["prompt_tokens"] - u["cached_tokens"] for u in usage)
    assert grew("ponder_engine_requests_finished_total", reason="length") + grew(
        "ponder_engine_requests_finished_total", reason="stop"
    ) == len(ran.jobs)
    assert grew("ponder_engine_prefix_cache_queried_tokens_total") >= sum(u["prompt_tokens"] for u in usage)
    assert 0 <= value(after, "ponder_engine_prefix_cache_hit_ratio") <= 1
    blocks = value(after, "ponder_engine_kv_cache_blocks_total")
    assert blocks > 0 and 0 <= value(after, "ponder_engine_kv_cache_blocks_used") <= blocks
    steps = grew("ponder_engine_steps_total")
    assert steps >= max(u["completion_tokens"] for u in usage)  # one token per request per step at most
    assert grew("ponder_engine_step_duration_seconds_count") == steps
    assert value(after, "ponder_engine_step_duration_seconds_bucket", le="+Inf") == value(
        after, "ponder_engine_steps_total"
    )
    assert 0 < grew("ponder_engine_step_duration_seconds_sum") < 60


def value_label(samples: dict, name: str, label: str) -> str:
    (labels,) = [dict(key[1]) for key in samples if key[0] == name]
    return labels[label]


def test_api_metrics_match_the_database(stack, ran):
    samples = scrape(f"{stack.base_url}/metrics")
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        by_status = dict(session.exec(select(Job.status, func.count()).group_by(Job.status)).all())
        completion = session.exec(
            select(Job.model, func.sum(Job.completion_tokens))
            .where(col(Job.finished_at).is_not(None))
            .group_by(Job.model)
        ).all()
    for status in ("queued", "running", "succeeded", "failed", "cancelled", "expired"):
        # Only finished states are stable while other tests' leftovers may still move.
        if status not in ("queued", "running"):
            assert value(samples, "ponder_jobs", status=status) == by_status.get(status, 0)
    for model, tokens in completion:
        assert value(samples, "ponder_tokens_total", model=model, kind="completion") == tokens
    assert value(samples, "ponder_jobs", status="succeeded") >= len(ran.jobs)
    for queue in ("inference", "webhooks", "maintenance", "batches"):
        assert value(samples, "ponder_queue_depth", queue=queue) >= 0
    assert value(samples, "ponder_inference_workers") >= 1
    assert value(samples, "ponder_webhook_deliveries", status="failed") >= 0
    # Requests under their route templates, never raw ids.
    assert value(samples, "ponder_http_requests_total", method="POST", route="/v1/jobs", status="202") >= len(ran.jobs)
    assert value(samples, "ponder_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") > 0
    assert value(samples, "ponder_http_request_duration_seconds_count", method="POST", route="/v1/jobs", status="202")
    assert not [key for key in samples if any(job["id"] in str(key) for job in ran.jobs)]
    httpx.get(f"{stack.base_url}/no/such/{uuid.uuid4()}")
    routes = {
        dict(k[1]).get("route") for k in scrape(f"{stack.base_url}/metrics") if k[0] == "ponder_http_requests_total"
    }
    assert "<unmatched>" in routes and not any(r.startswith("/no/such") for r in routes)


def test_flower_api_shows_tasks_and_the_engine_stats(stack, ran):
    with stack.flower() as flower:
        assert httpx.get(f"{stack.flower_url}/api/tasks").status_code == 401  # basic auth required
        tasks = flower.get("/api/tasks").json()
        workers = flower.get("/api/workers", params={"refresh": "true"}).json()
    assert ran.flower_while_running.get("state") == "STARTED", "Flower never saw the job running"
    for job in ran.jobs:
        task = tasks[job["id"]]
        assert task["name"] == "ponder.run_job" and task["state"] == "SUCCESS"
        assert task["sent"] and task["received"] and task["started"]  # the API's task-sent event, the worker's
        assert json.loads(task["args"].replace("'", '"')) == [job["id"]]  # the job id, nothing else
    inference = [stats for name, stats in workers.items() if name.startswith("inference@")]
    assert inference, workers.keys()
    stats = inference[0]["stats"]
    assert stats["ponder_model"] == "tiny-llama" and stats["ponder_decode_tokens"] > 0
    assert "ponder_kv_cache_blocks" in stats and "ponder_jobs_in_flight" in stats


def test_canary_prompt_stays_in_the_database(stack, ran):
    canary, job_id = ran.canary.encode(), ran.canary_job["id"].encode()
    # The scans can see: the job's id is in its broker message (decoded) while it runs.
    assert any(job_id in item for item in ran.redis_while_running)
    for item in ran.redis_while_running + redis_dump(stack):
        assert canary not in item, item[:300]
    with stack.flower() as flower:
        responses = [
            flower.get("/api/tasks"),
            flower.get(f"/api/task/info/{ran.canary_job['id']}"),
            flower.get("/api/workers", params={"refresh": "true"}),
            flower.get(f"/task/{ran.canary_job['id']}"),  # the task's page
        ]
    assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses]
    assert ran.canary_job["id"] in responses[0].text
    for response in responses:
        assert ran.canary not in response.text
    assert ran.canary not in json.dumps(ran.flower_while_running)  # its view while the job ran
    logs = {name: stack.log(name) for name in ("api", "worker", "webhooks-worker", "beat", "flower")}
    assert ran.canary_job["id"] in logs["worker"]  # the logs are there, and name the job by id
    for name, text in logs.items():
        assert ran.canary not in text, f"the canary is in the {name} log"
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:  # where it does live
        assert ran.canary in json.dumps(session.get(Job, uuid.UUID(ran.canary_job["id"])).request)


def redis_dump(stack) -> list[bytes]:
    """Every key of the stack's Redis database with its value, whatever the type, and anything in
    it that decodes from base64 (kombu stores message bodies that way)."""
    import redis

    client = redis.Redis.from_url(stack.env["PONDER_REDIS_URL"])
    items: list[bytes] = []
    for key in client.scan_iter(count=1000):
        items.append(key)
        items.extend(_values(client, key))
    return items + [decoded for item in items for decoded in _base64_parts(item)]


def _values(client, key: bytes) -> list[bytes]:
    kind = client.type(key).decode()
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "hash":
        return [b for pair in client.hgetall(key).items() for b in pair]
    if kind == "set":
        return list(client.smembers(key))
    if kind == "zset":
        return client.zrange(key, 0, -1)
    if kind == "stream":
        return [b for _, fields in client.xrange(key) for pair in fields.items() for b in pair]
    return []


def _base64_parts(item: bytes) -> list[bytes]:
    parts = []
    for match in re.findall(rb"[A-Za-z0-9+/]{16,}={0,2}", item):
        try:
            parts.append(base64.b64decode(match + b"=" * (-len(match) % 4)))
        except (binascii.Error, ValueError):
            pass
    return parts


@SQLITE_ONLY  # Flower's pages show the broker's view, not the database's
def test_flower_in_a_browser(stack, ran, tmp_path):
    """Headless Chromium signs in to Flower, finds the inference worker online with its engine
    numbers, and the jobs' ponder.run_job rows with their states; saves a screenshot."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (`make test` installs Debian's chromium where apt-get can)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    auth = {"username": stack.env.get("PONDER_FLOWER_USER", "admin"), "password": stack.env["PONDER_FLOWER_PASSWORD"]}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(http_credentials=auth, viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"{stack.flower_url}/workers")
            row = page.locator("#workers-table tbody tr", has_text="inference@")
            row.wait_for(timeout=30_000)
            assert "online" in row.inner_text().lower()
            page.screenshot(path=tmp_path / "flower-workers.png")

            page.goto(f"{stack.flower_url}/worker/{row.locator('a').first.inner_text().strip()}")
            page.locator("#worker-tab-other").click()
            page.locator("#tab-other.show", has_text="ponder_decode_tokens").wait_for(timeout=15_000)
            page.wait_for_timeout(400)  # the tab fades in
            page.screenshot(path=tmp_path / "flower-worker.png")

            # Filtered to the jobs' task: beat's maintenance tasks run every second and page them out.
            page.goto(f"{stack.flower_url}/tasks?name=ponder.run_job")
            shot = tmp_path / "flower-tasks.png"
            try:
                for job in ran.jobs:
                    page.locator("#tasks-table tbody tr", has_text=job["id"]).wait_for(timeout=30_000)
            finally:
                page.screenshot(path=shot)
            for job in ran.jobs:
                text = page.locator("#tasks-table tbody tr", has_text=job["id"]).inner_text()
                assert "ponder.run_job" in text and "SUCCESS" in text and "inference@" in text, text
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshots in {tmp_path}")


# As root on a machine without a network: no sandbox, no background connections.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
