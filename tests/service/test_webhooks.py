"""Webhook signing against the independent `standardwebhooks` library, both ways; the address rules
(submit time and connect time, with resolvers the test controls); retry timing; and single delivery
attempts against a real SQLite database and a real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session
from standardwebhooks.webhooks import Webhook

from ponder.service.db import database_engine, upgrade
from ponder.service.security import create_api_key
from ponder.service.settings import Settings, get_settings
from ponder.service.tables import (
    ApiKey,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from ponder.service.webhooks import WebhookVerificationError, verify
from ponder.service.webhooks.signing import generate_secret, sign_headers
from ponder.service.webhooks.url_safety import UnsafeWebhookUrl, check_url, pin_url, system_resolver
from ponder.workers import webhook_sender
from tests.isolation import modules_imported_with
from tests.receiver import start_receiver
from tests.stack import start_redis

BODY = b'{"type":"job.succeeded","data":{"id":"1"}}'


def test_secrets_are_whsec_and_at_least_24_random_bytes():
    a, b = generate_secret(), generate_secret()
    assert a.startswith("whsec_") and a != b
    assert len(base64.b64decode(a.removeprefix("whsec_"))) >= 24


def test_our_signature_verifies_with_standardwebhooks():
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", BODY)
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    assert headers["webhook-signature"].startswith("v1,")


def test_standardwebhooks_signature_verifies_with_ours():
    from datetime import UTC, datetime

    secret = generate_secret()
    now = datetime.now(UTC)
    signature = Webhook(secret).sign("msg_2", now, BODY.decode())
    headers = {"Webhook-Id": "msg_2", "Webhook-Timestamp": str(int(now.timestamp())), "Webhook-Signature": signature}
    assert verify(BODY, headers, secret) == json.loads(BODY)  # header names in any case


def test_verify_refuses_tampering_wrong_secret_missing_headers_and_stale_timestamps():
    secret = generate_secret()
    headers = sign_headers([secret], "msg_3", BODY)
    for body, hdrs, key in [
        (BODY + b" ", headers, secret),
        (BODY, headers, generate_secret()),
        (BODY, {**headers, "webhook-id": "msg_other"}, secret),
        (BODY, {k: v for k, v in headers.items() if k != "webhook-signature"}, secret),
        (BODY, {**headers, "webhook-timestamp": "yesterday"}, secret),
    ]:
        with pytest.raises(WebhookVerificationError):
            verify(body, hdrs, key)
    old = sign_headers([secret], "msg_3", BODY, timestamp=int(time.time()) - 301)
    new = sign_headers([secret], "msg_3", BODY, timestamp=int(time.time()) + 301)
    for hdrs in (old, new):
        with pytest.raises(WebhookVerificationError, match="tolerance"):
            verify(BODY, hdrs, secret)
        assert verify(BODY, hdrs, secret, tolerance=600)
    assert verify(BODY, old, secret, now=time.time() - 10)


def test_several_signatures_each_verify_with_their_secret():
    new, old = generate_secret(), generate_secret()
    headers = sign_headers([new, old], "msg_4", BODY)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret, own in ((new, signatures[0]), (old, signatures[1])):
        assert verify(BODY, headers, secret) and Webhook(secret).verify(BODY, headers)
        assert Webhook(secret).verify(BODY, {**headers, "webhook-signature": own})
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, generate_secret())


# -- where deliveries may go ----------------------------------------------------------------------


def resolving_to(*addresses: str):
    """A resolver the test controls: every name resolves to these addresses."""
    return lambda host, port: list(addresses)


PUBLIC = resolving_to("93.184.215.14")
LOOPBACK = resolving_to("127.0.0.1")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.7/hook",
        "http://172.16.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        # IPv4 carried in IPv6, judged by the IPv4 address it leads to
        "http://[64:ff9b::169.254.169.254]/",  # NAT64
        "http://[64:ff9b::10.0.0.5]/",
        "http://[64:ff9b:1::a00:5]/",  # local-use NAT64
        "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 169.254.169.254
        "http://[2002:a00:5::1]/",  # 6to4 of 10.0.0.5
        "http://[2001:0:4136:e378:8000:63bf:f5ff:fffa]/",  # Teredo, client 10.0.0.5
        "http://[::10.0.0.5]/",  # IPv4-compatible
    ],
)
def test_private_and_special_addresses_are_refused(url):
    with pytest.raises(UnsafeWebhookUrl):
        check_url(url, allow_private=False, require_https=False, resolver=PUBLIC)
    with pytest.raises(UnsafeWebhookUrl):
        pin_url(url, allow_private=False, require_https=False, resolver=PUBLIC)


def test_ipv6_forms_of_public_ipv4_addresses_pass():
    for url in ("http://[64:ff9b::8.8.8.8]/", "http://[2002:808:808::1]/", "http://[2001:4860:4860::8888]/"):
        check_url(url, allow_private=False, require_https=False, resolver=PUBLIC)
    with pytest.raises(UnsafeWebhookUrl, match="metadata"):  # not even where private ones may be reached
        check_url("http://[64:ff9b::169.254.169.254]/", allow_private=True, require_https=False)


@pytest.mark.parametrize("url", ["http://a..example/x", "http://" + "a" * 64 + ".example/x", "http://.example/"])
def test_host_names_that_cannot_be_encoded_are_refused(url):
    """An empty label or one over 63 characters: UnicodeError from the IDNA codec (a 500) before."""
    for check in (check_url, pin_url):
        with pytest.raises(UnsafeWebhookUrl, match="not a valid host name"):
            check(url, allow_private=False, require_https=False, resolver=PUBLIC)


def test_names_are_judged_by_every_address_they_resolve_to():
    check_url("http://hooks.example/x", allow_private=False, require_https=False, resolver=PUBLIC)
    for resolver in (LOOPBACK, resolving_to("93.184.215.14", "10.0.0.1"), resolving_to("::1")):
        with pytest.raises(UnsafeWebhookUrl, match="hooks.example resolves to"):
            check_url("http://hooks.example/x", allow_private=False, require_https=False, resolver=resolver)
    with pytest.raises(UnsafeWebhookUrl, match="loopback"):  # the system resolver: localhost is loopback
        check_url("http://localhost:9/x", allow_private=False, require_https=False)
    with pytest.raises(UnsafeWebhookUrl, match="does not resolve"):
        check_url("http://no-such-host.invalid/x", allow_private=False, require_https=False)


def test_allow_private_opens_private_networks_but_never_metadata():
    for url in ("http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://[::1]/x", "http://localhost/x"):
        check_url(url, allow_private=True, require_https=False)
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://0.0.0.0/"):
        with pytest.raises(UnsafeWebhookUrl):
            check_url(url, allow_private=True, require_https=False)
    with pytest.raises(UnsafeWebhookUrl, match="metadata"):
        check_url(
            "http://metadata.internal/",
            allow_private=True,
            require_https=False,
            resolver=resolving_to("169.254.169.254"),
        )


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://example.com/", "ftp://example.com/", "http://", "not a url", "//x/y"]
)
def test_only_http_urls(url):
    with pytest.raises(UnsafeWebhookUrl):
        check_url(url, allow_private=True, require_https=False, resolver=PUBLIC)


def test_production_rules():
    with pytest.raises(UnsafeWebhookUrl, match="https"):
        check_url("http://hooks.example/x", allow_private=False, require_https=True, resolver=PUBLIC)
    check_url("https://hooks.example/x", allow_private=False, require_https=True, resolver=PUBLIC)
    with pytest.raises(UnsafeWebhookUrl, match="credentials"):
        check_url("https://user:pw@hooks.example/x", allow_private=False, require_https=True, resolver=PUBLIC)
    with pytest.raises(UnsafeWebhookUrl, match="2048"):
        check_url("https://hooks.example/" + "a" * 2048, allow_private=False, require_https=True, resolver=PUBLIC)
    settings = Settings(_env_file=None, environment="production", secret_key="s" * 32)
    assert settings.webhook_allow_private is False and settings.webhook_require_https
    assert Settings(_env_file=None).webhook_allow_private is True
    assert Settings(
        _env_file=None, environment="production", secret_key="s" * 32, webhook_allow_private=True
    ).webhook_allow_private


def test_rebinding_is_caught_at_connect_time():
    """The name resolved to a public address when the job was submitted; by delivery time it
    resolves to loopback. The connect-time check refuses it."""
    check_url("https://hooks.example/x", allow_private=False, require_https=False, resolver=PUBLIC)
    with pytest.raises(UnsafeWebhookUrl, match="loopback"):
        pin_url("https://hooks.example/x", allow_private=False, require_https=False, resolver=LOOPBACK)


def test_pinned_url_connects_to_the_checked_address_under_the_original_name():
    pinned = pin_url("https://hooks.example:8443/a/b?c=1#frag", False, False, resolver=PUBLIC)
    assert pinned.url == "https://93.184.215.14:8443/a/b?c=1"
    assert pinned.host_header == "hooks.example:8443" and pinned.sni_hostname == "hooks.example"
    pinned = pin_url("http://hooks.example/", False, False, resolver=resolving_to("2606:2800:220:1::1"))
    assert pinned.url == "http://[2606:2800:220:1::1]/" and pinned.sni_hostname is None


# -- retry timing -----------------------------------------------------------------------------------


def test_retry_schedule_jitter_and_retry_after():
    settings = Settings(_env_file=None, webhook_retry_jitter=0.2)
    assert settings.webhook_retry_schedule == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 86400.0)
    for failed, base in enumerate(settings.webhook_retry_schedule, start=1):
        delay = webhook_sender.next_delay(failed, settings)
        assert 0.8 * base <= delay <= 1.2 * base
    assert webhook_sender.next_delay(8, settings) is None  # 8 attempts, then it gives up
    assert webhook_sender.next_delay(1, settings, retry_after=120) == 120
    assert webhook_sender.next_delay(1, settings, retry_after=10**9) == 24 * 3600
    assert webhook_sender.parse_retry_after("30") == 30
    assert webhook_sender.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert webhook_sender.parse_retry_after("soon") is None
    assert Settings(_env_file=None, webhook_retry_schedule="1, 2,3").webhook_retry_schedule == (1, 2, 3)


# -- single attempts against a real database and a real receiver -------------------------------------


def finished_job(session: Session) -> tuple[ApiKey, Job]:
    """A new key and a job of its that succeeded (flushed, not committed): what deliveries are of."""
    key, _ = create_api_key(session, "t")
    job = Job(
        api_key_id=key.id,
        model="m",
        status=JobStatus.succeeded,
        request={"prompt": "x", "max_tokens": 1},
        prompt_token_ids=[1],
        expires_at=utcnow() + timedelta(hours=1),
    )
    session.add(job)
    session.flush()
    return key, job


@pytest.fixture
def database(tmp_path, monkeypatch):
    """A migrated SQLite file that the worker code (sql_engine) uses, with a key and a finished job;
    the receivers' slots in a Redis database of the test's own."""
    url = f"sqlite:///{tmp_path / 'ponder.db'}"
    upgrade(url)
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1)
    monkeypatch.setenv("PONDER_DATABASE_URL", url)
    monkeypatch.setenv("PONDER_REDIS_URL", redis_url)
    get_settings.cache_clear()
    database_engine.cache_clear()  # a new database at the URL of the last test's
    with Session(database_engine(url)) as session:
        key, job = finished_job(session)
        session.commit()
        yield url, key.id, key.webhook_secret, job.id
    get_settings.cache_clear()
    database_engine.cache_clear()
    if redis_process is not None:
        redis_process.kill()


@pytest.fixture
def receiver():
    receiver = start_receiver()
    yield receiver
    receiver.stop()


def add_delivery(url: str, key_id: uuid.UUID, job_id: uuid.UUID, target: str) -> uuid.UUID:
    with Session(database_engine(url)) as session:
        delivery = WebhookDelivery(
            api_key_id=key_id,
            job_id=job_id,
            event_type=WebhookEvent.succeeded,
            url=target,
            payload=json.dumps({"type": "job.succeeded", "data": {"id": str(job_id)}}),
            next_attempt_at=utcnow(),
        )
        session.add(delivery)
        session.commit()
        return delivery.id


def delivery_state(url: str, delivery_id: uuid.UUID) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    from sqlmodel import select

    with Session(database_engine(url)) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        attempts = session.exec(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)).all()
        return delivery, list(attempts)


def test_one_attempt_signs_sends_and_records(database, receiver):
    url, key_id, secret, job_id = database
    receiver.secrets["/ok/unit"] = [secret]
    delivery_id = add_delivery(url, key_id, job_id, f"{receiver.url}/ok/unit")
    settings = Settings(_env_file=None, database_url=url)
    assert "succeeded" in webhook_sender.deliver(delivery_id, settings)
    assert "skipped" in webhook_sender.deliver(delivery_id, settings)  # finished: a second message changes nothing
    (request,) = receiver.at("/ok/unit")
    assert request.verified_by == [0] and request.webhook_id == f"msg_{delivery_id.hex}"
    delivery, (attempt,) = delivery_state(url, delivery_id)
    assert delivery.status == DeliveryStatus.succeeded and delivery.attempts == 1
    assert attempt.status_code == 200 and attempt.latency_ms >= 0 and attempt.response_body == "x" * 1024


def test_a_pinned_name_reaches_the_checked_address_with_its_host_header(database, receiver):
    url, key_id, secret, job_id = database
    port = receiver.server.server_address[1]
    receiver.secrets["/ok/pinned"] = [secret]
    delivery_id = add_delivery(url, key_id, job_id, f"http://hooks.example:{port}/ok/pinned")
    settings = Settings(_env_file=None, database_url=url, webhook_allow_private=True)
    assert "succeeded" in webhook_sender.deliver(delivery_id, settings, resolver=LOOPBACK)
    (request,) = receiver.at("/ok/pinned")
    assert request.headers["host"] == f"hooks.example:{port}"


@pytest.mark.parametrize("resolver", [LOOPBACK, None])
def test_delivery_time_check_refuses_without_sending(database, receiver, resolver):
    """Private addresses refused: a URL that now resolves to loopback (rebinding), or a loopback
    URL stored before the rules changed, is recorded as failed with the reason; no request leaves."""
    url, key_id, _, job_id = database
    port = receiver.server.server_address[1]
    target = f"http://hooks.example:{port}/ok/refused" if resolver else f"http://127.0.0.1:{port}/ok/refused"
    delivery_id = add_delivery(url, key_id, job_id, target)
    settings = Settings(_env_file=None, database_url=url, webhook_allow_private=False)
    outcome = webhook_sender.deliver(delivery_id, settings, resolver=resolver or system_resolver)
    assert "failed" in outcome
    delivery, (attempt,) = delivery_state(url, delivery_id)
    assert delivery.status == DeliveryStatus.failed and delivery.next_attempt_at is None
    assert attempt.status_code is None and "refused, no request sent" in attempt.error and "loopback" in attempt.error
    assert receiver.at("/ok/refused") == []


def test_the_webhooks_worker_does_not_load_the_engine():
    """Settings carries the engine's configuration (engine.config: plain dataclasses, no torch); the
    engine itself, its tokenizer and the inference tasks never load."""
    heavy = (
        "torch",
        "ponder.kernels",
        "ponder.engine.model_store",
        "ponder.engine.tokenizer",
        "ponder.engine.runtime.llm_engine",
    )
    heavy += ("ponder.engine.runtime.model_runner",)
    heavy += ("ponder.workers.tasks",)
    assert modules_imported_with("ponder.workers.webhook_tasks", heavy) == "[]"
