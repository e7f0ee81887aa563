"""Sending webhooks: claim a due delivery, send one signed attempt, record it, schedule the next;
and sweep due deliveries to the queue. Plain functions; the Celery tasks (ponder/workers/webhook_tasks.py)
are thin adapters.

The delivery row is the source of truth. `next_attempt_at` says when an attempt is due (long
retry delays never sit in a broker ETA, which a lost worker would lose and Redis would redeliver
after its visibility timeout); the beat sweep sends due deliveries to the queue. An attempt first
claims its row with one conditional UPDATE (due, not leased) that takes a lease, so the extra
messages the sweep may send never double a send; a worker that dies mid-attempt lets its lease
lapse, and the delivery is attempted again with the same webhook-id (receivers deduplicate on it).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache, partial

import httpx
from sqlalchemy import and_, bindparam, or_, update
from sqlmodel import Session, col, select

from ponder.service.db import sql_engine, until_database_answers
from ponder.service.settings import Settings
from ponder.service.tables import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from ponder.service.webhooks.deliveries import Targets
from ponder.service.webhooks.endpoints import default_secret, signing_secrets
from ponder.service.webhooks.signing import sign_headers
from ponder.service.webhooks.url_safety import Resolver, UnsafeWebhookUrl, pin_url, system_resolver
from ponder.workers.receiver_slots import ReceiverSlots

logger = logging.getLogger("ponder.webhooks")

USER_AGENT = "Ponder-Webhooks/1.0"
RESPONSE_BYTES = 1024  # of each response, kept with its attempt
LEASE_MARGIN_SECONDS = 5  # beyond the attempt's time limits: time to record it
MAX_RETRY_AFTER_SECONDS = 24 * 3600
SWEEP_BATCH = 500


@dataclass
class Outcome:
    """What one attempt came to."""

    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    response_body: str | None = None
    retry_after: float | None = None
    final: bool = False  # no retry: refused before sending, 410 Gone, or the target went away

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def deliver(delivery_id: uuid.UUID, settings: Settings, resolver: Resolver = system_resolver) -> str:
    """Make the due attempt of this delivery if this worker can claim it and a slot of its receiver
    and of its key are free (ponder/workers/receiver_slots.py). Returns what happened."""
    due = _due_url(delivery_id, settings)
    if due is None:
        return SKIPPED
    url, key_id = due
    slots = receiver_slots(settings)
    if not slots.take(url, key_id, str(delivery_id)):
        with Session(sql_engine(settings, background=True)) as session:
            postpone(session, [delivery_id], settings)
            session.commit()
        return "postponed: its receiver or its key has all its attempts in flight"
    try:
        delivery = claim_delivery(delivery_id, settings)
        if delivery is None:
            return SKIPPED
        secrets, stop = _signing_secrets(delivery, settings)
        outcome = Outcome(error=stop, final=True) if stop else send(delivery, secrets, settings, resolver)
        record = partial(record_attempt, delivery, outcome, settings)  # sent: waits out a database restart
        return until_database_answers(record, attempt_lease_seconds(settings), "recording a webhook attempt")
    finally:
        slots.give_back(url, key_id, str(delivery_id))


SKIPPED = "skipped (not due, being attempted elsewhere, or finished)"
POSTPONE_SPREAD = 3  # a postponed attempt is due again after 1 to 3 attempts' limits


def _due_url(delivery_id: uuid.UUID, settings: Settings) -> tuple[str, uuid.UUID] | None:
    """Where the delivery goes, and whose it is, if it is pending (whether it is due, the claim decides)."""
    with Session(sql_engine(settings, background=True)) as session:
        return session.exec(
            select(WebhookDelivery.url, WebhookDelivery.api_key_id).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending
            )
        ).first()


def receiver_slots(settings: Settings) -> ReceiverSlots:
    return ReceiverSlots(
        settings.redis_url,
        settings.webhook_max_in_flight_per_receiver,
        settings.webhook_max_in_flight_per_key,
        attempt_lease_seconds(settings),
    )


def postpone(session: Session, delivery_ids: list[uuid.UUID], settings: Settings) -> None:
    """Every slot of their receiver, or of their key, is taken: these attempts are due again once one
    of them has surely ended (an attempt's limit from now), each spread over up to POSTPONE_SPREAD
    of those so that a crowd of them does not come due at once only to be postponed again. No
    attempt is spent; the sweep sends them when due."""
    now = utcnow()
    statement = (  # run on the connection: one statement, executed for each delivery (executemany)
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id) == bindparam("delivery"), _due_and_free(now))
        .values(next_attempt_at=bindparam("later"), dispatched_at=None, updated_at=now)
    )
    later = [{"delivery": delivery_id, "later": postponed_until(now, settings)} for delivery_id in delivery_ids]
    session.connection().execute(statement, later)


def postponed_until(now: datetime, settings: Settings) -> datetime:
    return now + timedelta(seconds=settings.webhook_timeout_seconds * random.uniform(1, POSTPONE_SPREAD))


def hold_back(targets: Targets, key_id: uuid.UUID, settings: Settings) -> Targets:
    """An event's targets with those whose receiver or key has every slot taken held back, as
    `postpone` would (ReceiverSlots.hold_back)."""
    return receiver_slots(settings).hold_back(targets, key_id, partial(postponed_until, utcnow(), settings))


def _due_and_free(now: datetime):
    """A pending delivery whose attempt is due and that no worker holds (no live lease)."""
    lease = col(WebhookDelivery.lease_expires_at)
    return and_(
        col(WebhookDelivery.status) == DeliveryStatus.pending,
        col(WebhookDelivery.next_attempt_at) <= now,
        or_(lease.is_(None), lease < now),
    )


def attempt_lease_seconds(settings: Settings) -> float:
    """How long a claimed attempt is its worker's: beyond its whole time limit (connect, send and
    read together, `_post`), with time to record it, so no lease lapses under a live attempt."""
    return settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS


def claim_delivery(delivery_id: uuid.UUID, settings: Settings) -> WebhookDelivery | None:
    """Take the lease on a due delivery and open its attempt row, in one transaction."""
    now = utcnow()
    lease = now + timedelta(seconds=attempt_lease_seconds(settings))
    with Session(sql_engine(settings, background=True), expire_on_commit=False) as session:
        claimed = session.scalars(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery_id, _due_and_free(now))
            .values(attempts=WebhookDelivery.attempts + 1, lease_expires_at=lease, updated_at=now)
            .returning(WebhookDelivery)
        ).first()
        if claimed is None:
            session.commit()
            return None
        # An attempt left open was cut short by its worker's death: say so rather than leave it running.
        session.exec(
            update(WebhookAttempt)
            .where(col(WebhookAttempt.delivery_id) == delivery_id, col(WebhookAttempt.finished_at).is_(None))
            .values(finished_at=now, error="interrupted: the worker stopped before the attempt finished")
        )
        session.add(WebhookAttempt(delivery_id=delivery_id, attempt=claimed.attempts, started_at=now))
        session.commit()
        return claimed


def _signing_secrets(delivery: WebhookDelivery, settings: Settings) -> tuple[list[str], str | None]:
    """(secrets, None), or ([], why the delivery must stop) when its endpoint went away."""
    with Session(sql_engine(settings, background=True)) as session:
        if delivery.endpoint_id is None:
            return [default_secret(session, delivery.api_key_id)], None
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        assert endpoint is not None  # a foreign key, and endpoint rows are never deleted (deleted_at)
        if endpoint.deleted_at is not None:
            return [], "not sent: the webhook endpoint was deleted"
        if endpoint.disabled_at is not None:
            return [], f"not sent: the webhook endpoint is disabled ({endpoint.disabled_reason})"
        return signing_secrets(endpoint), None


def send(delivery: WebhookDelivery, secrets: list[str], settings: Settings, resolver: Resolver) -> Outcome:
    """One signed POST to the address checked just now (no redirects followed)."""
    assert settings.webhook_allow_private is not None  # Settings._webhook_defaults fills it in
    try:
        target = pin_url(delivery.url, settings.webhook_allow_private, settings.webhook_require_https, resolver)
    except UnsafeWebhookUrl as e:
        return Outcome(error=f"refused, no request sent: {e}", final=True)
    except OSError as e:  # DNS trouble may pass: retry
        return Outcome(error=f"could not resolve the host: {e}")
    body = delivery.payload.encode()
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **sign_headers(secrets, delivery.webhook_id, body),
    }
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    seconds = settings.webhook_timeout_seconds
    started = time.monotonic()
    try:
        response, head = asyncio.run(_post(target.url, body, headers, extensions, seconds))
    except TimeoutError:
        return Outcome(
            latency_ms=_ms_since(started), error=f"no whole answer within {seconds:g} s (the attempt's limit)"
        )
    except httpx.HTTPError as e:
        return Outcome(latency_ms=_ms_since(started), error=f"{type(e).__name__}: {e}"[:1000])
    return Outcome(
        status_code=response.status_code,
        latency_ms=_ms_since(started),
        response_body=head,
        retry_after=parse_retry_after(response.headers.get("retry-after"))
        if response.status_code in (429, 503)
        else None,
        final=response.status_code == 410,
    )


async def _post(url: str, body: bytes, headers: dict, extensions: dict, seconds: float) -> tuple[httpx.Response, str]:
    """The POST and the head of its answer, all within `seconds`: connecting, sending and reading
    together, since per-read timeouts let a receiver that trickles a byte at a time hold the
    attempt (and a worker thread) for as long as it likes. Its own connection: no keep-alive (a
    pooled connection to one address could carry another host's request, and every attempt checks
    its address anyway), no proxies from the environment."""
    async with asyncio.timeout(seconds):
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=_tls_context()) as client:
            request = client.build_request("POST", url, content=body, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                return response, await _read_head(response)
            finally:
                await response.aclose()


@lru_cache(maxsize=1)
def _tls_context():
    """httpx's certificate check, made once (building it reads the CA bundle)."""
    return httpx.create_ssl_context()


async def _read_head(response: httpx.Response) -> str:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= RESPONSE_BYTES:
            break
    return b"".join(chunks)[:RESPONSE_BYTES].decode("utf-8", errors="replace")


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def next_delay(failed_attempts: int, settings: Settings, retry_after: float | None = None) -> float | None:
    """Seconds until the next attempt after `failed_attempts` failures, None when the schedule is
    spent. A Retry-After from the receiver (429/503) replaces the scheduled delay."""
    schedule = settings.webhook_retry_schedule
    if failed_attempts > len(schedule):
        return None
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS)
    jitter = settings.webhook_retry_jitter
    return schedule[failed_attempts - 1] * random.uniform(1 - jitter, 1 + jitter)


def record_attempt(delivery: WebhookDelivery, outcome: Outcome, settings: Settings) -> str:
    """Close the attempt row and move the delivery on, in one transaction. Only the holder of the
    attempt moves it (its number still matches): a worker whose lease lapsed mid-send records its
    attempt but leaves the delivery to whoever claimed it since."""
    now = utcnow()
    values, state = _next_state(delivery, outcome, settings, now)
    with Session(sql_engine(settings, background=True)) as session:
        session.exec(
            update(WebhookAttempt)
            .where(col(WebhookAttempt.delivery_id) == delivery.id, col(WebhookAttempt.attempt) == delivery.attempts)
            .values(
                finished_at=now,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
                response_body=outcome.response_body,
            )
        )
        moved = session.exec(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery.id,
                col(WebhookDelivery.attempts) == delivery.attempts,
                col(WebhookDelivery.status) == DeliveryStatus.pending,
            )
            .values(**values, last_status_code=outcome.status_code, last_error=outcome.error, updated_at=now)
        ).rowcount
        if outcome.status_code == 410 and delivery.endpoint_id is not None:
            _disable_endpoint(session, delivery.endpoint_id, now)
        session.commit()
    return f"attempt {delivery.attempts}: {_describe(outcome)} -> {state if moved else 'superseded'}"


def _next_state(delivery: WebhookDelivery, outcome: Outcome, settings: Settings, now: datetime) -> tuple[dict, str]:
    done = {"lease_expires_at": None, "next_attempt_at": None, "finished_at": now}
    if outcome.succeeded:
        return done | {"status": DeliveryStatus.succeeded}, "succeeded"
    failed = delivery.failed_attempts + 1
    delay = None if outcome.final else next_delay(failed, settings, outcome.retry_after)
    if delay is None:
        return done | {"status": DeliveryStatus.failed, "failed_attempts": failed}, "failed"
    retry = {
        "failed_attempts": failed,
        "lease_expires_at": None,
        "next_attempt_at": now + timedelta(seconds=delay),
        "dispatched_at": None,  # nobody has sent the message for that attempt yet: the sweep will
    }
    return retry, f"retry in {delay:.1f} s"


def _disable_endpoint(session: Session, endpoint_id: uuid.UUID, now: datetime) -> None:
    session.exec(
        update(WebhookEndpoint)
        .where(col(WebhookEndpoint.id) == endpoint_id, col(WebhookEndpoint.disabled_at).is_(None))
        .values(disabled_at=now, disabled_reason="the receiver answered 410 Gone")
    )


def _describe(outcome: Outcome) -> str:
    return f"HTTP {outcome.status_code}" if outcome.status_code is not None else (outcome.error or "error")


def sweep_due(settings: Settings, enqueue) -> dict[str, int]:
    """Send every due delivery nobody holds and nobody has sent a message for lately: retries
    whose time has come, first messages that never left, attempts whose worker died; as many as
    their receivers' and keys' slots have room for now. The rest are postponed here, at the cost of
    a row written, not of a task that would only postpone them (a key with a crowd of deliveries to
    slow receivers would keep the webhooks worker busy doing that)."""
    now = utcnow()
    resend_before = now - timedelta(seconds=settings.webhook_resend_after_seconds)
    with Session(sql_engine(settings, background=True)) as session:
        due = session.exec(
            select(WebhookDelivery.id, WebhookDelivery.url, WebhookDelivery.api_key_id)
            .where(
                _due_and_free(now),
                or_(col(WebhookDelivery.dispatched_at).is_(None), col(WebhookDelivery.dispatched_at) < resend_before),
            )
            .order_by(col(WebhookDelivery.next_attempt_at))
            .limit(SWEEP_BATCH)
        ).all()
        sent, held = receiver_slots(settings).allot(list(due))
        if sent:
            session.exec(update(WebhookDelivery).where(col(WebhookDelivery.id).in_(sent)).values(dispatched_at=now))
        if held:
            postpone(session, held, settings)
        session.commit()
    for delivery_id in sent:
        enqueue(str(delivery_id))
    return {"sent": len(sent), "postponed": len(held)}
