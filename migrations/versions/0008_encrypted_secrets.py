"""webhook signing secrets encrypted at rest (api_keys.webhook_secret, webhook_endpoints.secret and
previous_secret: Fernet tokens under PONDER_SECRET_KEY, ponder/service/encryption.py); the plaintext
ones are encrypted in place

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

from ponder.service.encryption import decrypt, encrypt

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SECRET_COLUMNS = {"api_keys": ["webhook_secret"], "webhook_endpoints": ["secret", "previous_secret"]}


def upgrade() -> None:
    # Text: a Fernet token of a 40-character secret is ~140 characters.
    for table, columns in SECRET_COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.alter_column(column, type_=sa.Text(), existing_type=sa.String(length=64))
    _convert(encrypt)


def downgrade() -> None:
    _convert(decrypt)
    for table, columns in SECRET_COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.alter_column(column, type_=sa.String(length=64), existing_type=sa.Text())


def _convert(change: Callable[[str], str]) -> None:
    """Every stored secret through `change` (encrypt on the way up, decrypt on the way down)."""
    connection = op.get_bind()
    for table, columns in SECRET_COLUMNS.items():
        rows = connection.execute(sa.text(f"SELECT id, {', '.join(columns)} FROM {table}")).all()
        for row in rows:
            values = {column: change(value) for column, value in zip(columns, row[1:], strict=True) if value}
            if values:
                assignments = ", ".join(f"{column} = :{column}" for column in values)
                statement = sa.text(f"UPDATE {table} SET {assignments} WHERE id = :id")
                connection.execute(statement, {**values, "id": row[0]})
