"""The release before migrations: ledger.

Its tables (pools, reservations, fundings), before funding sources, settlement and reconciliation.

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
        "budget_pools",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("funded_fen", sa.BigInteger(), nullable=False),
        sa.Column("available_fen", sa.BigInteger(), nullable=False),
        sa.Column("reserved_fen", sa.BigInteger(), nullable=False),
        sa.Column("spent_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id"),
    )
    op.create_table(
        "funding_keys",
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key"),
    )
    op.create_table(
        "funding_proposals",
        sa.Column("proposal_id", sa.String(length=200), nullable=False),
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("proposed_by", sa.String(length=64), nullable=False),
        sa.Column("approved_by", sa.String(length=64), nullable=False),
        sa.Column("platform_ids", sa.String(length=2000), nullable=False),
        sa.PrimaryKeyConstraint("proposal_id"),
    )
    op.create_table(
        "pool_platforms",
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("platform_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", "platform_id"),
    )
    op.create_table(
        "reservation_attempts",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("qualification_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index(
        op.f("ix_reservation_attempts_started_at"),
        "reservation_attempts",
        ["started_at"],
        unique=False,
    )
    op.create_table(
        "reservations",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("pool_id", sa.String(length=64), nullable=False),
        sa.Column("platform_id", sa.String(length=64), nullable=False),
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("qualification_id", sa.String(length=64), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("unit_price_fen", sa.BigInteger(), nullable=False),
        sa.Column("subsidy_fen", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("release_reason", sa.String(length=16), nullable=False),
        sa.Column("payment_ref", sa.String(length=128), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index(
        "reservations_one_subsidy_per_serial",
        "reservations",
        ["serial"],
        unique=True,
        postgresql_where=sa.text("serial <> '' AND status IN ('PENDING', 'CAPTURED')"),
    )
    op.create_index(
        "reservations_pending_expiry", "reservations", ["status", "expires_at"], unique=False
    )
    op.create_table(
        "risk_list_entries",
        sa.Column("entry_id", sa.String(length=64), nullable=False),
        sa.Column("list", sa.String(length=8), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject_index", sa.String(length=128), nullable=False),
        sa.Column("subject_masked", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id"),
    )
    op.create_index(
        "risk_list_entries_live", "risk_list_entries", ["status", "expires_at"], unique=False
    )
    op.create_table(
        "risk_observations",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject_index", sa.String(length=128), nullable=False),
        sa.Column("person", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "risk_observations_by_subject",
        "risk_observations",
        ["action", "kind", "subject_index", "at"],
        unique=False,
    )
    op.create_table(
        "risk_rule_sets",
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("change_id", sa.String(length=80), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "risk_state",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("rules_version", sa.BigInteger(), nullable=False),
        sa.Column("lists_version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("risk_state")
    op.drop_table("risk_rule_sets")
    op.drop_index("risk_observations_by_subject", table_name="risk_observations")
    op.drop_table("risk_observations")
    op.drop_index("risk_list_entries_live", table_name="risk_list_entries")
    op.drop_table("risk_list_entries")
    op.drop_index("reservations_pending_expiry", table_name="reservations")
    op.drop_index(
        "reservations_one_subsidy_per_serial",
        table_name="reservations",
        postgresql_where=sa.text("serial <> '' AND status IN ('PENDING', 'CAPTURED')"),
    )
    op.drop_table("reservations")
    op.drop_index(op.f("ix_reservation_attempts_started_at"), table_name="reservation_attempts")
    op.drop_table("reservation_attempts")
    op.drop_table("pool_platforms")
    op.drop_table("funding_proposals")
    op.drop_table("funding_keys")
    op.drop_table("budget_pools")
    op.drop_table("streams")
    op.drop_table("handled_events")
    op.drop_index("events_global_order", table_name="events")
    op.drop_table("events")
    op.drop_table("checkpoints")
