"""jobs: an index on (status, batch_id, batch_line): the fair pick seeks each open batch's next line

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_status_batch_line", "jobs", ["status", "batch_id", "batch_line"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_batch_line", table_name="jobs")
