"""jobs: speculative decoding's draft tokens and accepted draft tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The server default fills existing rows, and keeps inserts from processes still running the
    # previous code (which does not know these columns) valid during a rolling deploy.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("draft_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("accepted_draft_tokens", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("accepted_draft_tokens")
        batch_op.drop_column("draft_tokens")
