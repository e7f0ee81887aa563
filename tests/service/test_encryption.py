"""Webhook signing secrets at rest: the database holds Fernet tokens under a key derived from
PONDER_SECRET_KEY, never the secrets; a rotated key keeps working through
PONDER_PREVIOUS_SECRET_KEYS until `reencrypt_secrets` rewrote everything; the migration encrypts
secrets stored before it (and its downgrade decrypts them). Real SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlmodel import Session

from ponder.service.db import database_engine, upgrade
from ponder.service.encryption import UndecryptableSecret, derive_key
from ponder.service.security import create_api_key
from ponder.service.settings import get_settings
from ponder.service.tables import ApiKey, WebhookEndpoint
from ponder.service.webhooks.endpoints import reencrypt_secrets
from tests.stack import database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, monkeypatch):
    use_keys(monkeypatch, "first-secret-key")
    with database(request.param, tmp_path) as url:
        yield url
    get_settings.cache_clear()


def use_keys(monkeypatch, secret_key: str, previous: str = "") -> None:
    monkeypatch.setenv("PONDER_SECRET_KEY", secret_key)
    monkeypatch.setenv("PONDER_PREVIOUS_SECRET_KEYS", previous)
    get_settings.cache_clear()


def stored(url: str, table: str, column: str, row_id: uuid.UUID) -> str:
    with database_engine(url).connect() as connection:
        query = sa.text(f"SELECT {column} FROM {table} WHERE id = :id")
        return connection.execute(query, {"id": row_id.hex if "sqlite" in url else row_id}).scalar_one()


def key_with_endpoint(url: str) -> tuple[ApiKey, WebhookEndpoint]:
    with Session(database_engine(url), expire_on_commit=False) as session:
        key, _ = create_api_key(session, "tenant")
        endpoint = WebhookEndpoint(api_key_id=key.id, url="https://example.com/hook", secret="whsec_endpointsecret")
        session.add(endpoint)
        session.commit()
    return key, endpoint


def read(url: str, key_id: uuid.UUID, endpoint_id: uuid.UUID) -> tuple[str | None, str]:
    with Session(database_engine(url)) as session:
        return session.get_one(ApiKey, key_id).webhook_secret, session.get_one(WebhookEndpoint, endpoint_id).secret


def test_the_database_holds_tokens_not_secrets(url):
    upgrade(url)
    key, endpoint = key_with_endpoint(url)
    box = Fernet(derive_key("first-secret-key"))
    for table, column, row_id, secret in [
        ("api_keys", "webhook_secret", key.id, key.webhook_secret),
        ("webhook_endpoints", "secret", endpoint.id, endpoint.secret),
    ]:
        token = stored(url, table, column, row_id)
        assert secret and secret not in token
        assert box.decrypt(token.encode()).decode() == secret
    assert read(url, key.id, endpoint.id) == (key.webhook_secret, endpoint.secret)
    if url.startswith("sqlite:///"):  # and nowhere in the database's files, WAL included
        database_engine(url).dispose()
        path = Path(url.removeprefix("sqlite:///"))
        stored_bytes = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert len(stored_bytes) > 0
        for secret in (key.webhook_secret, endpoint.secret):
            assert secret.encode() not in stored_bytes
            assert secret.removeprefix("whsec_").encode() not in stored_bytes


def test_a_rotated_key_reads_through_the_previous_one_until_everything_is_reencrypted(url, monkeypatch):
    upgrade(url)
    key, endpoint = key_with_endpoint(url)
    use_keys(monkeypatch, "second-secret-key")  # rotated, but the old key not listed: a clear error
    with pytest.raises(UndecryptableSecret, match="PONDER_PREVIOUS_SECRET_KEYS"):
        read(url, key.id, endpoint.id)
    use_keys(monkeypatch, "second-secret-key", previous="first-secret-key")
    assert read(url, key.id, endpoint.id) == (key.webhook_secret, endpoint.secret)
    with Session(database_engine(url)) as session:
        assert reencrypt_secrets(session) == 2
    use_keys(monkeypatch, "second-secret-key")  # the old key dropped: everything is under the new one
    assert read(url, key.id, endpoint.id) == (key.webhook_secret, endpoint.secret)
    token = stored(url, "webhook_endpoints", "secret", endpoint.id)
    assert Fernet(derive_key("second-secret-key")).decrypt(token.encode()).decode() == endpoint.secret


def test_the_migration_encrypts_the_secrets_stored_before_it(url):
    upgrade(url, "0007")
    key_id, endpoint_id = uuid.uuid4(), uuid.uuid4()
    ids = {
        "key": key_id.hex if "sqlite" in url else str(key_id),
        "endpoint": endpoint_id.hex if "sqlite" in url else str(endpoint_id),
    }
    with database_engine(url).begin() as connection:  # rows as the code before encryption wrote them
        connection.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, prefix, key_hash, webhook_secret, created_at) "
                "VALUES (:key, 'k', 'p', 'h', 'whsec_plainkeysecret', '2026-11-30 00:00:00')"
            ),
            ids,
        )
        connection.execute(
            sa.text(
                "INSERT INTO webhook_endpoints (id, api_key_id, url, events, secret, created_at) "
                "VALUES (:endpoint, :key, 'https://example.com/h', '[]', 'whsec_plainendpoint', '2026-11-30 00:00:00')"
            ),
            ids,
        )
    upgrade(url)
    assert "whsec_plainkeysecret" not in stored(url, "api_keys", "webhook_secret", key_id)
    assert read(url, key_id, endpoint_id) == ("whsec_plainkeysecret", "whsec_plainendpoint")
    from alembic import command

    from ponder.service.db import alembic_config

    command.downgrade(alembic_config(url), "0007")
    assert stored(url, "webhook_endpoints", "secret", endpoint_id) == "whsec_plainendpoint"
