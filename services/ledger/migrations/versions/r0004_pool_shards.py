"""Budget pools split into shards.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

A hot pool's available budget may be split over several streams (``PoolSharded``), so that
checkouts on one pool spread over several locks: ``budget_shards`` holds shards 1.. of such a
pool (shard 0 stays in ``budget_pools``), ``budget_pools.shards`` and ``shards_made`` say how
it is split, ``reservations.shard`` which shard holds an order, ``funding_proposals.shards`` the
count a funding asks for. Every pool written before this is one shard, which is what the server
defaults say: nothing to replay.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budget_shards",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("funded_fen", sa.BigInteger(), nullable=False),
        sa.Column("available_fen", sa.BigInteger(), nullable=False),
        sa.Column("reserved_fen", sa.BigInteger(), nullable=False),
        sa.Column("spent_fen", sa.BigInteger(), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "shard"),
        if_not_exists=True,
    )
    for table, column, default in (
        ("budget_pools", "shards", "1"),
        ("budget_pools", "shards_made", "1"),
        ("reservations", "shard", "0"),
        ("funding_proposals", "shards", "0"),
    ):
        op.add_column(
            table,
            sa.Column(column, sa.Integer(), server_default=default, nullable=False),
            if_not_exists=True,
        )


def downgrade() -> None:
    op.drop_column("funding_proposals", "shards")
    op.drop_column("reservations", "shard")
    op.drop_column("budget_pools", "shards_made")
    op.drop_column("budget_pools", "shards")
    op.drop_table("budget_shards")
