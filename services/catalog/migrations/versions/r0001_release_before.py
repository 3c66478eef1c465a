"""The release before migrations: catalog.

Its tables (merchants, products, units, policies, sales ledger).

Revision ID: 0001
Revises:
Create Date: 2026-12-01

The tables exactly as ``create_all`` made them before there were migrations (commit f15d285,
the release before), so a database that release created is stamped here and upgraded.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.kernel.eventstore import Xid8

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("tx_id", Xid8(), server_default=sa.text("pg_current_xact_id()"), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("stream_id", sa.String(length=200), nullable=False),
        sa.Column("stream_version", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("event_id"),
        sa.UniqueConstraint("stream_id", "stream_version", name="events_stream_version"),
    )
    op.create_index("events_global_order", "events", ["tx_id", "position"], unique=False)
    op.create_table(
        "handled_events",
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column(
            "handled_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )
    op.create_table(
        "streams",
        sa.Column("stream_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("stream_id"),
    )
    op.create_table(
        "merchants",
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("licence_number", sa.String(length=32), nullable=False),
        sa.Column("contact_masked", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("merchant_id"),
    )
    op.create_table(
        "policies",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("drafted_by", sa.String(length=64), nullable=False),
        sa.Column("draft_reason", sa.Text(), nullable=False),
        sa.Column("drafted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approved_by", sa.String(length=64), server_default="", nullable=False),
        sa.Column("approve_reason", sa.Text(), server_default="", nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "price_history",
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("price_fen", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("sku", "event_id"),
    )
    op.create_index("price_history_by_time", "price_history", ["sku", "effective_at"], unique=False)
    op.create_table(
        "products",
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("grade", sa.Integer(), nullable=False),
        sa.Column("brand", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("energy_label_code", sa.String(length=64), nullable=False),
        sa.Column("list_price_fen", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("sku"),
    )
    op.create_index(op.f("ix_products_merchant_id"), "products", ["merchant_id"], unique=False)
    op.create_table(
        "sales_orders",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("sku", sa.String(length=64), server_default="", nullable=False),
        sa.Column("merchant_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("category", sa.String(length=64), server_default="", nullable=False),
        sa.Column("platform_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("serial", sa.String(length=64), server_default="", nullable=False),
        sa.Column("unit_price_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("policy_version", sa.String(length=64), server_default="", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("captured", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("refunded", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("release_reason", sa.String(length=16), server_default="", nullable=False),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index(
        "sales_orders_by_merchant", "sales_orders", ["merchant_id", "sku"], unique=False
    )
    op.create_index(
        "sales_orders_by_serial",
        "sales_orders",
        ["serial"],
        unique=False,
        postgresql_where="serial <> ''",
    )
    op.create_table(
        "switches",
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )


def downgrade() -> None:
    op.drop_table("switches")
    op.drop_index(
        "sales_orders_by_serial", table_name="sales_orders", postgresql_where="serial <> ''"
    )
    op.drop_index("sales_orders_by_merchant", table_name="sales_orders")
    op.drop_table("sales_orders")
    op.drop_index(op.f("ix_products_merchant_id"), table_name="products")
    op.drop_table("products")
    op.drop_index("price_history_by_time", table_name="price_history")
    op.drop_table("price_history")
    op.drop_table("policy_versions")
    op.drop_table("policies")
    op.drop_table("merchants")
    op.drop_table("streams")
    op.drop_table("handled_events")
    op.drop_index("events_global_order", table_name="events")
    op.drop_table("events")
    op.drop_table("checkpoints")
