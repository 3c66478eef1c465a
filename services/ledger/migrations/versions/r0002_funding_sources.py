"""Funding sources, tranches, sub-budgets and thresholds; settlement; reconciliation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

What issue 11 added to the ledger: the tables of each pool's funding sources, categories,
alert thresholds and tranches, of settlement (batches, orders, evidence, clawbacks) and of
discount-bill reconciliation, and five columns: ``budget_pools.scheduled_fen``,
``funding_proposals.tranches``, ``reservations.sources``, ``reservations.paid_amount_fen`` and
``reservations.capture_flag``.

A database made by ``create_all`` between that release and migrations has some of this already
(the new tables, never the columns), so every step is ``if_not_exists``. The new columns get
server defaults, so rows written before them (and by a ledger of the release before, which
names none of them) are valid; their true values are in the events alone (a reservation's
funding-source parts, a pool's per-source figures), so this revision has the ledger's read
models replayed from the events in the same transaction (``rebuild_read_models``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The read models are replayed from the events after this revision (services/kernel/schema.py).
rebuild_read_models = True


def upgrade() -> None:
    op.create_table(
        "bill_captures",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("platform_id", sa.String(length=64), nullable=False),
        sa.Column("payment_ref", sa.String(length=128), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("order_id"),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_bill_captures_captured_at"),
        "bill_captures",
        ["captured_at"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "budget_alerts",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("threshold_bp", sa.Integer(), nullable=False),
        sa.Column("spent_fen", sa.BigInteger(), nullable=False),
        sa.Column("base_fen", sa.BigInteger(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("reached_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "category", "threshold_bp"),
        if_not_exists=True,
    )
    op.create_table(
        "budget_categories",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("reserved_fen", sa.BigInteger(), nullable=False),
        sa.Column("spent_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "category"),
        if_not_exists=True,
    )
    op.create_table(
        "budget_sources",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("funded_fen", sa.BigInteger(), nullable=False),
        sa.Column("available_fen", sa.BigInteger(), nullable=False),
        sa.Column("reserved_fen", sa.BigInteger(), nullable=False),
        sa.Column("spent_fen", sa.BigInteger(), nullable=False),
        sa.Column("scheduled_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "source"),
        if_not_exists=True,
    )
    op.create_table(
        "budget_tranches",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("funding_key", sa.String(length=200), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("releases_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "funding_key", "index"),
        if_not_exists=True,
    )
    op.create_index(
        "budget_tranches_due",
        "budget_tranches",
        ["released", "releases_at"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "clawbacks",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("fen", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("deducted_by", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_clawbacks_merchant_id"),
        "clawbacks",
        ["merchant_id"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "reconciliation_lines",
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("line", sa.BigInteger(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("bill_payment_ref", sa.String(length=128), nullable=False),
        sa.Column("ledger_payment_ref", sa.String(length=128), nullable=False),
        sa.Column("bill_fen", sa.BigInteger(), nullable=False),
        sa.Column("ledger_fen", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ledger_status", sa.String(length=16), nullable=False),
        sa.Column("first_line", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("file_sha256", "seq"),
        if_not_exists=True,
    )
    op.create_table(
        "reconciliations",
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reconciled_by", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("file_sha256"),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_reconciliations_reconciled_at"),
        "reconciliations",
        ["reconciled_at"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "settlement_batches",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("approved_by", sa.String(length=128), nullable=False),
        sa.Column("period_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_to", sa.DateTime(timezone=True), nullable=False),
        sa.Column("gross_fen", sa.BigInteger(), nullable=False),
        sa.Column("clawback_fen", sa.BigInteger(), nullable=False),
        sa.Column("net_fen", sa.BigInteger(), nullable=False),
        sa.Column("payment_ref", sa.String(length=128), nullable=False),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("clawbacks", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_settlement_batches_merchant_id"),
        "settlement_batches",
        ["merchant_id"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "settlement_evidence",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("evidenced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_settlement_evidence_merchant_id"),
        "settlement_evidence",
        ["merchant_id"],
        unique=False,
        if_not_exists=True,
    )
    op.create_table(
        "settlement_orders",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
        if_not_exists=True,
    )

    # The columns, with the defaults an old row (or an old ledger's insert) gets; the replay
    # below then writes every row's true values from the events.
    for table, column, default in (
        ("budget_pools", sa.Column("scheduled_fen", sa.BigInteger(), nullable=False), "0"),
        ("funding_proposals", sa.Column("tranches", sa.JSON(), nullable=False), "'[]'"),
        ("reservations", sa.Column("sources", sa.JSON(), nullable=False), "'[]'"),
        ("reservations", sa.Column("capture_flag", sa.String(length=32), nullable=False), "''"),
    ):
        column.server_default = sa.DefaultClause(sa.text(default))
        op.add_column(table, column, if_not_exists=True)
        op.alter_column(table, column.name, server_default=sa.text(default))
    op.add_column(
        "reservations",
        sa.Column("paid_amount_fen", sa.BigInteger(), nullable=True),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_column("reservations", "capture_flag")
    op.drop_column("reservations", "paid_amount_fen")
    op.drop_column("reservations", "sources")
    op.drop_column("funding_proposals", "tranches")
    op.drop_column("budget_pools", "scheduled_fen")
    op.drop_table("settlement_orders")
    op.drop_index(op.f("ix_settlement_evidence_merchant_id"), table_name="settlement_evidence")
    op.drop_table("settlement_evidence")
    op.drop_index(op.f("ix_settlement_batches_merchant_id"), table_name="settlement_batches")
    op.drop_table("settlement_batches")
    op.drop_index(op.f("ix_reconciliations_reconciled_at"), table_name="reconciliations")
    op.drop_table("reconciliations")
    op.drop_table("reconciliation_lines")
    op.drop_index(op.f("ix_clawbacks_merchant_id"), table_name="clawbacks")
    op.drop_table("clawbacks")
    op.drop_index("budget_tranches_due", table_name="budget_tranches")
    op.drop_table("budget_tranches")
    op.drop_table("budget_sources")
    op.drop_table("budget_categories")
    op.drop_table("budget_alerts")
    op.drop_index(op.f("ix_bill_captures_captured_at"), table_name="bill_captures")
    op.drop_table("bill_captures")
