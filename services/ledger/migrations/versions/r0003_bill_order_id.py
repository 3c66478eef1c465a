"""Multi-item orders: the discount bill adds an order's items up.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``bill_captures.bill_order_id`` is the platform's order id a captured item is billed under (an
item's reservation is keyed ``order_id/item``; a whole order's is its order id). Rows written
before items existed are whole orders: their bill order id is their order id. Added nullable,
filled, then made NOT NULL (expand, then contract, in one transaction).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "bill_captures",
        sa.Column("bill_order_id", sa.String(length=64), nullable=True),
        if_not_exists=True,
    )
    op.execute("UPDATE bill_captures SET bill_order_id = order_id WHERE bill_order_id IS NULL")
    op.alter_column("bill_captures", "bill_order_id", nullable=False)
    op.create_index(
        op.f("ix_bill_captures_bill_order_id"),
        "bill_captures",
        ["bill_order_id"],
        unique=False,
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_bill_captures_bill_order_id"), table_name="bill_captures")
    op.drop_column("bill_captures", "bill_order_id")
