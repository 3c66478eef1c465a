"""VerifyItem's clock: a counter every change to a product, a merchant or a price moves.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

``catalog_clock`` holds one row; a deferred trigger on ``products``, ``merchants`` and
``price_history`` gives it a new random ``mark`` (and counts ``v`` up) once per transaction
that writes one of them, at its commit (``projections.clock_ddl``, which ``create_all`` on a
scratch database runs too). A replica answers VerifyItem from the rows it cached while the mark
still reads what it read with them. New objects only; nothing to replay.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.catalog.projections import clock_ddl
from services.kernel.eventstore import Xid8

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "catalog_clock",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("v", sa.BigInteger(), nullable=False),
        sa.Column("mark", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("tx", Xid8(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        if_not_exists=True,
    )
    for statement in clock_ddl():
        op.execute(statement)


def downgrade() -> None:
    for table in ("products", "merchants", "price_history"):
        op.execute(f"DROP TRIGGER IF EXISTS catalog_clock_tick ON {table}")
    op.execute("DROP FUNCTION IF EXISTS catalog_clock_tick()")
    op.drop_table("catalog_clock")
