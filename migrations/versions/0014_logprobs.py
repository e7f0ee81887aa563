"""jobs: logprobs (each sample's output tokens' log probabilities, packed: ponder/service/logprobs.py)
and prompt_logprobs (the prompt's tokens' after the first, packed); openai_completion (a legacy
completion's job: what its answer shows that the request does not say)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("logprobs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("prompt_logprobs", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("openai_completion", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("openai_completion")
        batch_op.drop_column("prompt_logprobs")
        batch_op.drop_column("logprobs")
