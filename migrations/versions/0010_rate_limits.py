"""rate limits and quotas per API key (api_keys.requests_per_minute, tokens_per_minute,
tokens_per_day, max_concurrent_jobs; NULL: the deployment's default, 0: unlimited)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMIT_COLUMNS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent_jobs")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        for column in LIMIT_COLUMNS:
            batch_op.add_column(sa.Column(column, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        for column in reversed(LIMIT_COLUMNS):
            batch_op.drop_column(column)
