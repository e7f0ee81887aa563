"""Webhooks through the real stack: jobs on the Celery inference worker, deliveries on the Celery
webhooks worker, due retries sent by beat's sweep, and a real HTTP receiver on loopback that
verifies every request with the independent `standardwebhooks` library.

The session stack allows private addresses (PONDER_ENVIRONMENT=test), since the receiver is on
loopback; the SSRF tests use a second API process on the same database with
PONDER_WEBHOOK_ALLOW_PRIVATE=false, and tests/service/test_webhooks.py covers the delivery-time check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime

import httpx
import pytest
from sqlmodel import Session
from standardwebhooks.webhooks import Webhook

from ponder.cli.devstack import free_port
from ponder.service.db import database_engine
from ponder.service.security import create_api_key
from tests.e2e.test_api_errors import assert_error
from tests.e2e.test_jobs import submit
from tests.receiver import start_receiver
from tests.stack import ROOT, wait_final

SHORT_JOB = {"prompt": "ping", "max_tokens": 3, "seed": 1}


@pytest.fixture(scope="module")
def receiver():
    receiver = start_receiver()
    yield receiver
    receiver.stop()


def new_key(stack) -> str:
    """A key of its own, so the endpoints a test registers see only that test's jobs."""
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        return create_api_key(session, "webhooks")[1]


def default_secret(client: httpx.Client) -> str:
    response = client.get("/v1/webhooks/default-secret")
    assert response.status_code == 200, response.text
    return response.json()["secret"]


def wait_deliveries(client: httpx.Client, job_id: str, count: int = 1, timeout: float = 60) -> list[dict]:
    """The job's deliveries once `count` of them exist and none is pending any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}/deliveries")
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        if len(data) >= count and all(d["status"] != "pending" for d in data):
            return data
        time.sleep(0.2)
    raise AssertionError(f"deliveries of {job_id} still pending: {data}")


def job_with_webhook(client: httpx.Client, receiver, path: str) -> tuple[dict, list[dict]]:
    receiver.secrets[path] = [default_secret(client)]
    job = submit(client, {**SHORT_JOB, "webhook_url": receiver.url + path})
    final = wait_final(client, job["id"])
    assert final["status"] == "succeeded"
    return final, wait_deliveries(client, job["id"])


def test_a_finished_job_is_delivered_once_verified_and_can_be_redelivered(stack, receiver):
    path = f"/ok/{uuid.uuid4().hex}"
    with stack.client() as client:
        job, (delivery,) = job_with_webhook(client, receiver, path)
        time.sleep(1.0)  # a few sweeps later: still one request
        (request,) = receiver.at(path)
        assert request.verified_by == [0] and request.status == 200
        assert request.headers["webhook-id"] == delivery["webhook_id"]
        assert request.headers["content-type"] == "application/json"
        event = json.loads(request.body)
        assert event["type"] == "job.succeeded" and event["timestamp"].endswith("Z")
        data = event["data"]
        assert data["id"] == job["id"] and data["status"] == "succeeded" and data["usage"] == job["usage"]
        assert data["finish_reason"] == job["finish_reason"] and data["answer"] == job["answer"]
        assert data["links"]["job"].endswith(f"/v1/jobs/{job['id']}")
        assert "content" not in data and len(request.body) < 1024  # thin: the text is fetched from the API
        assert delivery["status"] == "succeeded" and delivery["event_type"] == "job.succeeded"
        assert delivery["endpoint_id"] is None and delivery["url"] == receiver.url + path
        (attempt,) = delivery["attempts"]
        assert attempt["attempt"] == 1 and attempt["status_code"] == 200 and attempt["error"] is None
        assert attempt["latency_ms"] >= 0 and attempt["response_body"] == "x" * 1024  # the first 1 KB

        redelivered = client.post(f"/v1/deliveries/{delivery['id']}/redeliver")
        assert redelivered.status_code == 202, redelivered.text
        first, again = receiver.wait_for(path, 2)
        assert again.webhook_id == first.webhook_id and again.body == first.body and again.verified_by == [0]
        (after,) = wait_deliveries(client, job["id"])
        assert [a["status_code"] for a in after["attempts"]] == [200, 200]


def test_a_failing_receiver_gets_retries_with_the_same_id_then_success(stack, receiver):
    path = f"/fail3/{uuid.uuid4().hex}"
    with stack.client() as client:
        _, (delivery,) = job_with_webhook(client, receiver, path)
    requests = receiver.at(path)
    assert [r.status for r in requests] == [500, 500, 500, 200]
    assert all(r.verified_by == [0] for r in requests)
    assert len({r.webhook_id for r in requests}) == 1 and requests[0].webhook_id == delivery["webhook_id"]
    assert len({r.body for r in requests}) == 1
    timestamps = [int(r.headers["webhook-timestamp"]) for r in requests]
    assert timestamps == sorted(set(timestamps)), "each attempt is signed afresh"
    assert len({r.headers["webhook-signature"] for r in requests}) == 4
    assert delivery["status"] == "succeeded"
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 500), (4, 200)]
    assert all(a["response_body"] == "no" for a in delivery["attempts"][:3])


def test_a_receiver_that_is_down_exhausts_the_schedule_and_the_job_is_unaffected(stack):
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with stack.client() as client:
        job = submit(client, {**SHORT_JOB, "webhook_url": dead})
        final = wait_final(client, job["id"])
        (delivery,) = wait_deliveries(client, job["id"])
        assert client.get(f"/v1/jobs/{job['id']}").json() == final
    assert final["status"] == "succeeded"
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4]  # the first and the 3 retries of the test schedule
    assert all(a["status_code"] is None and "ConnectError" in a["error"] for a in attempts)


def test_410_disables_the_endpoint_until_enabled(stack, receiver):
    with stack.client(new_key(stack)) as client:
        path = f"/gone/{uuid.uuid4().hex}"
        created = client.post("/v1/webhooks", json={"url": receiver.url + path, "description": "old"})
        assert created.status_code == 201, created.text
        endpoint = created.json()
        receiver.secrets[path] = [endpoint["secret"]]
        job = submit(client, SHORT_JOB)
        wait_final(client, job["id"])
        (delivery,) = wait_deliveries(client, job["id"])
        assert delivery["status"] == "failed" and [a["status_code"] for a in delivery["attempts"]] == [410]
        assert delivery["endpoint_id"] == endpoint["id"]
        shown = client.get(f"/v1/webhooks/{endpoint['id']}").json()
        assert shown["status"] == "disabled" and "410" in shown["disabled_reason"] and "secret" not in shown
        later = submit(client, SHORT_JOB)
        wait_final(client, later["id"])
        time.sleep(1.0)
        assert client.get(f"/v1/jobs/{later['id']}/deliveries").json()["data"] == []  # nothing to a disabled endpoint
        assert_error(client.post(f"/v1/deliveries/{delivery['id']}/redeliver"), 409)
        assert len(receiver.at(path)) == 1
        # Enabled again, it gets the next job's event (this receiver answers 410 again: disabled again).
        enabled = client.post(f"/v1/webhooks/{endpoint['id']}/enable")
        assert enabled.status_code == 200, enabled.text
        assert enabled.json()["status"] == "enabled" and enabled.json()["disabled_reason"] is None
        again = submit(client, SHORT_JOB)
        wait_final(client, again["id"])
        (delivery,) = wait_deliveries(client, again["id"])
        assert [a["status_code"] for a in delivery["attempts"]] == [410]
        assert client.get(f"/v1/webhooks/{endpoint['id']}").json()["status"] == "disabled"
        assert_error(client.post(f"/v1/webhooks/{uuid.uuid4()}/enable"), 404)
    assert len(receiver.at(path)) == 2


def test_secret_rotation_signs_with_both_secrets_and_events_are_filtered(stack, receiver):
    with stack.client(new_key(stack)) as client:
        paths = {"final": f"/ok/{uuid.uuid4().hex}", "started": f"/ok/{uuid.uuid4().hex}"}
        final_only = client.post("/v1/webhooks", json={"url": receiver.url + paths["final"]}).json()
        started = client.post(
            "/v1/webhooks", json={"url": receiver.url + paths["started"], "events": ["job.started"]}
        ).json()
        assert final_only["events"] == ["job.succeeded", "job.failed", "job.cancelled", "job.expired"]
        rotated = client.post(f"/v1/webhooks/{final_only['id']}/rotate-secret")
        assert rotated.status_code == 200, rotated.text
        new_secret, old_secret = rotated.json()["secret"], final_only["secret"]
        assert new_secret != old_secret and rotated.json()["previous_secret_expires_at"]
        receiver.secrets[paths["final"]] = [new_secret, old_secret]
        receiver.secrets[paths["started"]] = [started["secret"]]
        listed = client.get("/v1/webhooks").json()["data"]
        assert {e["id"] for e in listed} == {final_only["id"], started["id"]}
        assert all("secret" not in e for e in listed)

        job = submit(client, SHORT_JOB)
        wait_final(client, job["id"])
        deliveries = wait_deliveries(client, job["id"], count=2)
        assert sorted(d["event_type"] for d in deliveries) == ["job.started", "job.succeeded"]
        assert all(d["status"] == "succeeded" for d in deliveries)

        deleted = client.delete(f"/v1/webhooks/{started['id']}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert_error(client.get(f"/v1/webhooks/{started['id']}"), 404)
    (request,) = receiver.at(paths["final"])
    assert request.verified_by == [0, 1]  # each secret verifies on its own
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret, signature in zip((new_secret, old_secret), signatures, strict=True):
        assert Webhook(secret).verify(request.body, {**request.headers, "webhook-signature": signature})
    (started_request,) = receiver.at(paths["started"])
    assert json.loads(started_request.body)["type"] == "job.started" and started_request.verified_by == [0]


@pytest.mark.parametrize("when", ["mid-request", "awaiting-retry"])
def test_a_killed_webhooks_worker_still_delivers_exactly_once(stack, receiver, when):
    """SIGKILL the webhooks worker while a delivery is pending: in the middle of its HTTP request,
    or while its retry waits (the receiver answered 503 with Retry-After: 3). The row, not a
    broker message, holds the delivery: after a restart it is delivered, and the receiver sees
    one webhook-id."""
    path = f"/{'hang' if when == 'mid-request' else 'busy'}/{uuid.uuid4().hex}"
    receiver.release.clear()
    with stack.client() as client:
        receiver.secrets[path] = [default_secret(client)]
        job = submit(client, {**SHORT_JOB, "webhook_url": receiver.url + path})
        receiver.wait_for(path, 1)
        if when == "awaiting-retry":  # the 503 is recorded: the retry is scheduled in the row only
            wait_attempts(client, job["id"], lambda a: a and a[0]["status_code"] == 503)
        stack.kill("webhooks-worker")
        receiver.release.set()
        stack.start("webhooks-worker")
        (delivery,) = wait_deliveries(client, job["id"])
        time.sleep(1.0)  # a few sweeps later: nothing more arrives
    requests = receiver.at(path)
    assert len({r.webhook_id for r in requests}) == 1 and all(r.verified_by == [0] for r in requests)
    assert len(requests) == 2 and delivery["status"] == "succeeded"
    first, second = delivery["attempts"]
    assert second["status_code"] == 200
    if when == "mid-request":
        assert first["status_code"] is None and first["error"].startswith("interrupted")
    else:
        assert first["status_code"] == 503 and requests[0].status == 503
        waited = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(first["finished_at"])
        assert waited.total_seconds() >= 3, "Retry-After was not honoured"


def wait_attempts(client: httpx.Client, job_id: str, done, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.get(f"/v1/jobs/{job_id}/deliveries").json()["data"]
        if data and done(data[0]["attempts"]):
            return data[0]["attempts"]
        time.sleep(0.05)
    raise AssertionError(f"attempts of {job_id}: {data}")


# -- SSRF: a second API with private addresses refused ----------------------------------------------


@pytest.fixture(scope="module")
def strict_api(stack):
    """The same database and Redis, served by an API with PONDER_WEBHOOK_ALLOW_PRIVATE=false."""
    port = free_port()
    env = {**stack.env, "PONDER_WEBHOOK_ALLOW_PRIVATE": "false", "PONDER_API_PORT": str(port)}
    with open(stack.workdir / "strict-api.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ponder", "api"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "the strict API did not start"
            try:
                httpx.get(f"{base_url}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


REFUSED = [
    "http://127.0.0.1:8080/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/hook",
    "http://localhost:8080/hook",  # a name that resolves to loopback
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http://[64:ff9b::169.254.169.254]/",  # NAT64: IPv4 inside IPv6, a private address
    "http://[64:ff9b::10.0.0.5]/",
    "http://[2002:a00:5::1]/",  # 6to4 of 10.0.0.5
    "http://a..example/hook",  # an empty label: the IDNA codec's UnicodeError was a 500
    "http://" + "a" * 64 + ".example/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_targets_are_refused_at_submit_time(stack, strict_api, url):
    before = strict_api.get("/v1/jobs", params={"limit": 1}).json()["data"]
    assert_error(strict_api.post("/v1/jobs", json={**SHORT_JOB, "webhook_url": url}), 422, "webhook_url")
    assert_error(strict_api.post("/v1/webhooks", json={"url": url}), 422, "url")
    assert strict_api.get("/v1/jobs", params={"limit": 1}).json()["data"] == before  # nothing was queued
    assert all(e["url"] != url for e in strict_api.get("/v1/webhooks").json()["data"])


def test_metadata_addresses_are_refused_even_where_private_ones_are_allowed(stack):
    with stack.client() as client:
        for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"):
            error = assert_error(client.post("/v1/jobs", json={**SHORT_JOB, "webhook_url": url}), 422, "webhook_url")
            assert "metadata" in error["message"]


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "not a url"}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "http://example.com/" + "a" * 2100}, "url"),
        ({"url": "http://127.0.0.1:9/x", "events": ["job.exploded"]}, "events.0"),
        ({"url": "http://127.0.0.1:9/x", "events": []}, "events"),
        ({"url": "http://127.0.0.1:9/x", "description": "d" * 501}, "description"),
        ({"url": "http://127.0.0.1:9/x", "secret": "whsec_mine"}, "secret"),
        ({}, "url"),
    ],
)
def test_bad_webhook_bodies(stack, body, param):
    with stack.client() as client:
        assert_error(client.post("/v1/webhooks", json=body), 422, param)


def test_long_and_invalid_job_webhook_urls(stack):
    with stack.client() as client:
        for url in ("http://example.com/" + "a" * 2100, "no scheme", "http://", "mailto:a@b.c"):
            assert_error(client.post("/v1/jobs", json={**SHORT_JOB, "webhook_url": url}), 422, "webhook_url")


def test_unknown_and_other_keys_webhooks_and_deliveries_are_404(stack, receiver):
    with stack.client(new_key(stack)) as other:
        theirs = other.post("/v1/webhooks", json={"url": receiver.url + "/ok/theirs"}).json()
        receiver.secrets["/ok/theirs"] = [theirs["secret"]]
        receiver.secrets["/ok/theirs-job"] = [default_secret(other)]
        their_job = submit(other, {**SHORT_JOB, "webhook_url": receiver.url + "/ok/theirs-job"})
        wait_final(other, their_job["id"])
        their_delivery = wait_deliveries(other, their_job["id"], count=2)[0]
    with stack.client() as client:
        for webhook_id in (str(uuid.uuid4()), theirs["id"]):
            assert_error(client.get(f"/v1/webhooks/{webhook_id}"), 404, "webhook_id")
            assert_error(client.delete(f"/v1/webhooks/{webhook_id}"), 404, "webhook_id")
            assert_error(client.post(f"/v1/webhooks/{webhook_id}/rotate-secret"), 404, "webhook_id")
        for delivery_id in (str(uuid.uuid4()), their_delivery["id"]):
            assert_error(client.get(f"/v1/deliveries/{delivery_id}"), 404, "delivery_id")
            assert_error(client.post(f"/v1/deliveries/{delivery_id}/redeliver"), 404, "delivery_id")
        assert_error(client.get(f"/v1/jobs/{their_job['id']}/deliveries"), 404, "job_id")
        assert_error(client.get("/v1/webhooks/not-a-uuid"), 422, "webhook_id")
        assert_error(client.post(f"/v1/webhooks/{theirs['id']}/rotate-secret", json={"grace_seconds": -1}), 422)
        assert theirs["id"] not in [e["id"] for e in client.get("/v1/webhooks").json()["data"]]
    with httpx.Client(base_url=stack.base_url) as anonymous:
        assert_error(anonymous.get("/v1/webhooks"), 401)
        assert_error(anonymous.get("/v1/webhooks/default-secret"), 401)
