"""A batch's lines against their key's tokens per day (ponder/service/rate_limits.py): each line's job
reserves its prompt + n x max tokens in the key's day as it is stored, and its worker settles it
to what it used, as a direct job's. A line the day has no room for is refused alone, with the 429
its route would have answered: `--tokens-per-day` caps a key's spend, batches included. (Tokens
per minute and jobs at once stay for direct work: a batch runs behind it by design.)"""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session

from ponder.service.errors import LimitExceeded, body_of, status_code_of
from ponder.service.rate_limits import Limits, RateLimitCharge, settle
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Batch, BatchLineError

Row = dict[str, Any] | BatchLineError


def admit_lines(session: Session, batch: Batch, rows: list[Row], settings: Settings) -> list[Row]:
    """The rows, each line's job given its id and admitted against the key's day, or refused."""
    key = session.get(ApiKey, batch.api_key_id)
    day = Limits(tokens_per_day=Limits.of(key, settings).tokens_per_day) if key is not None else Limits()
    charge = RateLimitCharge(batch.api_key_id, day, settings)
    return [_admitted(session, charge, batch, row) if isinstance(row, dict) else row for row in rows]


def _admitted(session: Session, charge: RateLimitCharge, batch: Batch, row: dict[str, Any]) -> Row:
    row = row | {"id": uuid.uuid4()}
    tokens = len(row["prompt_token_ids"]) + row["request"].get("n", 1) * row["request"]["max_tokens"]
    try:
        charge.reserve(session, row["id"], tokens)
    except LimitExceeded as e:
        status = status_code_of(e)
        return BatchLineError(
            batch_id=batch.id,
            line=row["batch_line"],
            custom_id=row["batch_custom_id"],
            status_code=status,
            body=body_of(e, status),
        )
    return row


def give_back(rows: list[Row], settings: Settings) -> None:
    """The reservations of lines that were not stored after all (the batch stopped validating)."""
    for row in rows:
        if isinstance(row, dict):
            settle(row["id"], 0, settings)
