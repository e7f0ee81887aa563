"""jobs: the checkpoint a re-run resumes from, the tokens it resumed from, why it could not

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # resumed_tokens' server default fills existing rows and keeps older processes' inserts valid.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("resumed_tokens", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("restart_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("restart_reason")
        batch_op.drop_column("resumed_tokens")
        batch_op.drop_column("checkpoint")
