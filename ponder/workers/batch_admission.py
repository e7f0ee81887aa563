"""A batch's lines against their key's limits, as each chunk's jobs are stored:
- **enqueued tokens** (`PONDER_BATCH_ENQUEUED_TOKENS_PER_KEY`, OpenAI's enqueued-token limit): the
  prompt tokens of the key's batch lines that wait to start, across its batches. A line that would
  pass it is refused; the lines after it still fit if they are shorter.
- **tokens per day** (ponder/service/rate_limits.py): each line's job reserves its prompt + n x max
  tokens in the key's day, and its worker settles it to what it used, as a direct job's: `--tokens-
  per-day` caps a key's spend, batches included. (Tokens per minute and jobs at once stay for
  direct work: a batch runs behind it by design.)
A refused line is refused alone, with the 429 its route would have answered. Two validations of
one key at once may each see the same room: the enqueued limit is then passed by a chunk at most."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from ponder.service.errors import LimitExceeded, ServiceError, body_of, status_code_of
from ponder.service.rate_limits import Limits, RateLimitCharge, settle
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Batch, BatchLineError, Job, JobStatus

Row = dict[str, Any] | BatchLineError


def admit_lines(session: Session, batch: Batch, rows: list[Row], settings: Settings) -> list[Row]:
    """The rows, each line's job given its id and admitted against the key's limits, or refused."""
    key = session.get(ApiKey, batch.api_key_id)
    day = Limits(tokens_per_day=Limits.of(key, settings).tokens_per_day) if key is not None else Limits()
    charge = RateLimitCharge(batch.api_key_id, day, settings)
    limit, enqueued = settings.batch_enqueued_tokens_per_key, enqueued_tokens(session, batch.api_key_id)
    admitted: list[Row] = []
    for row in rows:
        if isinstance(row, dict):
            row = _admitted(session, charge, batch, row, enqueued, limit)
            enqueued += row["prompt_tokens"] if isinstance(row, dict) else 0
        admitted.append(row)
    return admitted


def enqueued_tokens(session: Session, key_id: uuid.UUID) -> int:
    """The prompt tokens of the key's batch lines that are queued (stored, not started)."""
    statement = select(func.coalesce(func.sum(Job.prompt_tokens), 0)).where(
        Job.api_key_id == key_id, Job.status == JobStatus.queued, col(Job.batch_id).is_not(None)
    )
    return int(session.exec(statement).one())


def _admitted(
    session: Session, charge: RateLimitCharge, batch: Batch, row: dict[str, Any], enqueued: int, limit: int
) -> Row:
    row = row | {"id": uuid.uuid4()}
    tokens = len(row["prompt_token_ids"]) + row["request"].get("n", 1) * row["request"]["max_tokens"]
    try:
        if enqueued + row["prompt_tokens"] > limit:
            message = (
                f"enqueued token limit reached: this key's batch lines waiting to start hold {enqueued} prompt "
                f"tokens, this line has {row['prompt_tokens']}, the limit is {limit}"
            )
            raise LimitExceeded(message, code="token_limit_exceeded")
        charge.reserve(session, row["id"], tokens)
    except LimitExceeded as e:
        return _refused(batch, row, e)
    return row


def _refused(batch: Batch, row: dict[str, Any], error: ServiceError) -> BatchLineError:
    status = status_code_of(error)
    return BatchLineError(
        batch_id=batch.id,
        line=row["batch_line"],
        custom_id=row["batch_custom_id"],
        status_code=status,
        body=body_of(error, status),
    )


def give_back(rows: list[Row], settings: Settings) -> None:
    """The reservations of lines that were not stored after all (the batch stopped validating)."""
    for row in rows:
        if isinstance(row, dict):
            settle(row["id"], 0, settings)
