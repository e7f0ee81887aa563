"""jobs: vote (self-consistency: the majority vote over an n-sample job's answers), stopped_early
and early_stop_unspent_tokens (the vote stopped the samples still running; their budget left)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The server defaults fill existing rows and keep older processes' inserts valid.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vote", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("stopped_early", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("early_stop_unspent_tokens", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("early_stop_unspent_tokens")
        batch_op.drop_column("stopped_early")
        batch_op.drop_column("vote")
