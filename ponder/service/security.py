"""API keys: random bearer tokens; only their sha256 is stored (they carry 256 bits of entropy, so
a plain hash is enough, as for GitHub tokens)."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

from sqlalchemy import update
from sqlmodel import Session, col, select

from ponder.service.tables import ApiKey, utcnow
from ponder.service.webhooks.signing import generate_secret

KEY_PREFIX = "pdr_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ApiKey's rate-limit columns (ponder/service/rate_limits.py): None, the deployment's default; 0, unlimited
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent_jobs")


def create_api_key(session: Session, name: str, limits: dict[str, float | None] | None = None) -> tuple[ApiKey, str]:
    """Store a new key, with `limits` (LIMIT_FIELDS; absent: the deployment's defaults; and its
    fair-share `weight`); returns
    the row and the key itself (shown once, never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=key[:12], key_hash=hash_key(key), webhook_secret=generate_secret())
    for field, value in (limits or {}).items():
        setattr(row, field, value)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, key


def one_at_a_time(session: Session, key_id: uuid.UUID) -> None:
    """Write the key's row to itself, first thing in the transaction: the key's transactions that do
    so run one after another (PostgreSQL's row lock, SQLite's write lock), each seeing what the
    last committed: a count checked against a per-key limit, then an insert, cannot both pass."""
    session.exec(update(ApiKey).where(col(ApiKey.id) == key_id).values(weight=ApiKey.weight))


def find_active_key(session: Session, key: str) -> ApiKey | None:
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    return row if row is not None and row.revoked_at is None else None


class KeyCache:
    """Recently verified keys, so a busy client is not looked up on every request. A revoked key
    stops working within `ttl` seconds (only valid keys are cached, never failures)."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, ApiKey]] = {}

    def get(self, key: str) -> ApiKey | None:
        """The key if it was verified less than `ttl` ago: no query."""
        cached = self._entries.get(key)
        return cached[1] if cached is not None and time.monotonic() - cached[0] < self.ttl else None

    def lookup(self, session: Session, key: str) -> ApiKey | None:
        cached = self.get(key)
        if cached is not None:
            return cached
        now = time.monotonic()
        row = find_active_key(session, key)
        if row is None:
            self._entries.pop(key, None)
            return None
        session.expunge(row)  # a plain value now, shared by later requests
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (now, row)
        return row


def find_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    """The key with this id or the prefix `keys list` shows; None when nothing (or several) match."""
    matches = session.exec(select(ApiKey).where(ApiKey.prefix == key_id_or_prefix)).all()
    if not matches:
        try:
            row = session.get(ApiKey, uuid.UUID(key_id_or_prefix))
        except ValueError:
            row = None
        matches = [row] if row is not None else []
    return matches[0] if len(matches) == 1 else None


def set_key_limits(session: Session, key_id_or_prefix: str, limits: dict[str, float | None]) -> ApiKey | None:
    """Change a key's rate limits (LIMIT_FIELDS given; the others kept) or its `weight`. They apply within
    PONDER_API_KEY_CACHE_SECONDS (the API's KeyCache)."""
    row = find_key(session, key_id_or_prefix)
    if row is None:
        return None
    for name, value in limits.items():
        setattr(row, name, value)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def revoke_api_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    """Revoke by id or by the prefix `keys list` shows; None when nothing (or several) match."""
    row = find_key(session, key_id_or_prefix)
    if row is None:
        return None
    row.revoked_at = row.revoked_at or utcnow()
    session.add(row)
    session.commit()
    session.refresh(row)
    return row
