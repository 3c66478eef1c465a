"""Supervisor reviews: each review of a sample of operator actions, and its sampled actions
with their verdicts (the read model of the ``review/<id>`` streams).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

New tables only (each if it does not exist: a database made by ``create_all`` may hold them);
nothing to backfill, since no review was recorded before this revision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "supervision_review_actions",
        sa.Column("review_id", sa.String(length=80), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("operator", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("case_id", sa.String(length=80), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("review_id", "event_id"),
        if_not_exists=True,
    )
    op.create_table(
        "supervision_reviews",
        sa.Column("review_id", sa.String(length=80), nullable=False),
        sa.Column("reviewer", sa.String(length=64), nullable=False),
        sa.Column("operator", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("population", sa.Integer(), nullable=False),
        sa.Column("population_last_event_id", sa.String(length=36), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("review_id"),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("supervision_reviews", if_exists=True)
    op.drop_table("supervision_review_actions", if_exists=True)
