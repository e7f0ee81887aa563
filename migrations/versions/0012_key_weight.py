"""api_keys: weight (fair share between keys when a free worker slot picks the next job)

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0010"  # (0011: none yet)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
    # The fair pick groups a class of queued jobs by key, and counts running jobs by key.
    op.create_index("ix_jobs_status_batch_key", "jobs", ["status", "batch_id", "api_key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_batch_key", table_name="jobs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("weight")
