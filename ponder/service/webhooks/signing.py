"""Signing webhooks as the Standard Webhooks spec (standardwebhooks.com) has it: secrets, signing
and verifying, and the event payload.

A message carries three headers: `webhook-id` (the same on every retry, so receivers deduplicate
on it), `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature`, space-separated
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the key base64-decoded from the secret
after `whsec_`. Several signatures appear while a rotated-out secret still signs.

Standard library only: receivers import `verify` from here (through `ponder.service.webhooks`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


class WebhookVerificationError(Exception):
    """The request is not a genuine, fresh webhook from Ponder."""


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as e:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from e
    if not key:
        raise ValueError("empty webhook secret")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `{msg_id}.{timestamp}.{body}`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(secrets_: Iterable[str], msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers, one signature per secret."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signatures = " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}


def verify(
    body: bytes | str, headers: Mapping[str, str], secret: str, tolerance: int = 300, now: float | None = None
) -> Any:
    """Check a received webhook and return its parsed JSON body. Raises WebhookVerificationError
    when a header is missing, the timestamp is more than `tolerance` seconds away from now
    (replays), or no `v1` signature matches `secret`."""
    body = body.encode() if isinstance(body, str) else body
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and timestamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not unix seconds") from None
    if abs((time.time() if now is None else now) - sent_at) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance (a replay, or a wrong clock)")
    expected = sign(secret, msg_id, sent_at, body).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return json.loads(body)
    raise WebhookVerificationError("no signature matches the secret")


# -- events ---------------------------------------------------------------------------------------


# What an event body carries of the job's output: erased with the job (ponder/service/retention.py).
PAYLOAD_OUTPUT_FIELDS = ("answer", "vote")


def event_payload(job, event_type: str, base_url: str, timestamp: str) -> str:
    """A thin event body: what happened and where to fetch the rest (keeps every message small).
    The usage is the job's, as `GET /v1/jobs/{id}` shows it."""
    from ponder.service.job_public import Usage  # here: receivers import this module for `verify` alone

    link = f"{base_url}/v1/jobs/{job.id}"
    data = {
        "id": str(job.id),
        "object": "job",
        "status": str(job.status),
        "finish_reason": job.finish_reason,
        "usage": Usage.model_validate(job).model_dump(),
        "answer": job.answer,  # n > 1: the vote's answer
        # n > 1: the vote over the samples' answers (job_public.VotePublic), and whether it stopped samples early
        "vote": job.vote,
        "stopped_early": job.stopped_early,
        "links": {"job": link, "stream": f"{link}/stream", "deliveries": f"{link}/deliveries"},
    }
    body = {"type": event_type, "timestamp": timestamp, "data": data}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
