"""The release before migrations: audit.

Its tables (the merkle log, its tree and checkpoints).

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
        "audit_checkpoints",
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tree_size"),
    )
    op.create_table(
        "audit_entries",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("service", sa.String(length=32), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("chain_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_table(
        "audit_entry_keys",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("key", "idx"),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_tree",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_tree_nodes",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
    )
    op.create_index(
        "audit_leaves_by_hash",
        "audit_tree_nodes",
        ["hash", "idx"],
        unique=False,
        postgresql_where=sa.text("level = 0"),
    )


def downgrade() -> None:
    op.drop_index(
        "audit_leaves_by_hash", table_name="audit_tree_nodes", postgresql_where=sa.text("level = 0")
    )
    op.drop_table("audit_tree_nodes")
    op.drop_table("audit_tree")
    op.drop_table("audit_head")
    op.drop_table("audit_entry_keys")
    op.drop_table("audit_entries")
    op.drop_table("audit_checkpoints")
    op.drop_table("streams")
    op.drop_table("handled_events")
    op.drop_index("events_global_order", table_name="events")
    op.drop_table("events")
    op.drop_table("checkpoints")
