"""Erasing finished jobs' prompts and outputs: `DELETE /v1/jobs/{id}` for one job, and beat's retention
sweep (`PONDER_RETENTION_DAYS`, ponder/workers/maintenance.py:purge_old_jobs) for every job that
finished longer ago than that. Erased: the prompt (the request's `messages` or raw `prompt`,
`prompt_token_ids`), the output (`content`, `reasoning_content`, `answer`, `samples`, `vote`,
`logprobs`, `prompt_logprobs`, the checkpoint's token ids and values), the error text (it may quote
the input), the output in the job's webhook payloads (`answer`, `vote`) and what the receiver
answered them (it may echo them), and its Redis stream (the caller deletes that, after the commit).
Kept: the row, its status, timings, usage (billing: /v1/usage counts it still), metadata and
sampling parameters. A batch's output file holds its lines' outputs: it is the client's own file
(DELETE /v1/files/{id}), and retention deletes it with the same cutoff. Only a final job is erased
(a worker may still write a queued or running one), and erasing is idempotent: an erased job has
`prompt_token_ids == []` (no real prompt is empty), which is what the sweep skips."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import String, cast, update
from sqlmodel import Session, col, select

from ponder.service.tables import FINAL_STATUSES, Job, WebhookAttempt, WebhookDelivery, utcnow
from ponder.service.webhooks.signing import PAYLOAD_OUTPUT_FIELDS

ERASED_REQUEST_FIELDS = ("messages", "prompt")  # the request's prompt; its sampling parameters stay


def erased_values(request: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of an erased job (`request`: the job's stored request)."""
    return {
        "request": {k: v for k, v in request.items() if k not in ERASED_REQUEST_FIELDS},
        "prompt_token_ids": [],
        "content": None,
        "reasoning_content": None,
        "answer": None,
        "samples": None,
        "vote": None,
        "logprobs": None,
        "prompt_logprobs": None,
        "checkpoint": None,
        "error": None,
        "updated_at": utcnow(),
    }


def not_erased():
    """The SQL condition of a job whose prompt is still stored (JSON compared as its text: SQLite
    and PostgreSQL's `json` both keep `[]` as written)."""
    return cast(col(Job.prompt_token_ids), String) != "[]"


def erase_jobs(session: Session, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Erase those of `job_ids` that are final and not erased yet; returns their ids. The caller
    commits, then deletes their streams (ponder/service/streams.py JobSignals.delete_streams)."""
    rows = session.exec(
        select(Job.id, Job.request).where(col(Job.id).in_(job_ids), col(Job.status).in_(FINAL_STATUSES), not_erased())
    ).all()
    for job_id, request in rows:
        session.exec(update(Job).where(col(Job.id) == job_id).values(**erased_values(request)))
    erased = [job_id for job_id, _ in rows]
    if erased:
        _erase_webhook_outputs(session, erased)
    return erased


def _erase_webhook_outputs(session: Session, job_ids: list[uuid.UUID]) -> None:
    """Event payloads carry the job's output (ponder/service/webhooks/signing.py:event_payload), and a
    receiver's answer, kept with each attempt, may echo it."""
    deliveries = session.exec(select(WebhookDelivery).where(col(WebhookDelivery.job_id).in_(job_ids))).all()
    for delivery in deliveries:
        body = json.loads(delivery.payload)
        data = body.get("data", {})
        if any(data.get(name) is not None for name in PAYLOAD_OUTPUT_FIELDS):
            data.update(dict.fromkeys(PAYLOAD_OUTPUT_FIELDS))
            delivery.payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
            session.add(delivery)
    session.exec(
        update(WebhookAttempt)
        .where(col(WebhookAttempt.delivery_id).in_([delivery.id for delivery in deliveries]))
        .values(response_body=None)
    )
