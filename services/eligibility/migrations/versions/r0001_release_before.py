"""The release before migrations: eligibility.

Its tables (consumers, persons, qualifications, quotas, risk).

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
        "consumer_erasures",
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer_id"),
    )
    op.create_table(
        "consumer_identifiers",
        sa.Column("space", sa.String(length=32), nullable=False),
        sa.Column("blind_index", sa.String(length=128), nullable=False),
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("masked", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("space", "blind_index", "consumer_id", "kind"),
    )
    op.create_index(
        "consumer_identifiers_by_consumer", "consumer_identifiers", ["consumer_id"], unique=False
    )
    op.create_table(
        "consumer_platforms",
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("platform_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("consumer_id", "platform_id"),
    )
    op.create_table(
        "consumers",
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("id_number_index", sa.String(length=128), nullable=False),
        sa.Column("phone_index", sa.String(length=128), nullable=False),
        sa.Column("id_number_masked", sa.String(length=32), nullable=False),
        sa.Column("phone_masked", sa.String(length=32), nullable=False),
        sa.Column("platform_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("consumer_id"),
        sa.UniqueConstraint("id_number_index"),
    )
    op.create_index(op.f("ix_consumers_phone_index"), "consumers", ["phone_index"], unique=False)
    op.create_table(
        "identity_failures",
        sa.Column("id_number_index", sa.String(length=128), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id_number_index", "day"),
    )
    op.create_table(
        "person_held_when_linked",
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("person_id", "category"),
    )
    op.create_table(
        "person_keys",
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("wrapped_key", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("consumer_id"),
    )
    op.create_table(
        "person_members",
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("consumer_id"),
    )
    op.create_index(
        op.f("ix_person_members_person_id"), "person_members", ["person_id"], unique=False
    )
    op.create_table(
        "persons",
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("consumers", sa.BigInteger(), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("person_id"),
    )
    op.create_table(
        "policies",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "qualification_availability",
        sa.Column("qualification_id", sa.String(length=64), nullable=False),
        sa.Column("available_from", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("qualification_id"),
    )
    op.create_table(
        "qualifications",
        sa.Column("qualification_id", sa.String(length=64), nullable=False),
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("quota_day", sa.String(length=10), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("qualification_id"),
    )
    op.create_index(
        "qualifications_by_consumer", "qualifications", ["consumer_id", "category"], unique=False
    )
    op.create_index("qualifications_by_order", "qualifications", ["order_id"], unique=False)
    op.create_index(
        "qualifications_due",
        "qualifications",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'AVAILABLE'"),
    )
    op.create_index(
        "qualifications_one_per_order",
        "qualifications",
        ["order_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('LOCKED', 'USED')"),
    )
    op.create_table(
        "quota_usage",
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("category", "day"),
    )
    op.create_table(
        "risk_changes",
        sa.Column("change_id", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("proposed_by", sa.String(length=64), nullable=False),
        sa.Column("approved_by", sa.String(length=64), nullable=False),
        sa.Column("proposal", sa.LargeBinary(), nullable=False),
        sa.Column("activated_version", sa.BigInteger(), nullable=False),
        sa.Column("proposed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("change_id"),
    )
    op.create_index(
        "risk_changes_by_status", "risk_changes", ["status", "proposed_at"], unique=False
    )
    op.create_table(
        "risk_decisions",
        sa.Column("decision_id", sa.String(length=64), nullable=False),
        sa.Column("service", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("outcome", sa.String(length=8), nullable=False),
        sa.Column("rule_id", sa.String(length=80), nullable=False),
        sa.Column("rule_set_version", sa.BigInteger(), nullable=False),
        sa.Column("lists_version", sa.BigInteger(), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("consumer_id", sa.String(length=64), nullable=False),
        sa.Column("reference", sa.String(length=64), nullable=False),
        sa.Column("subject_kind", sa.String(length=16), nullable=False),
        sa.Column("subject_index", sa.String(length=128), nullable=False),
        sa.Column("subject_masked", sa.String(length=64), nullable=False),
        sa.Column("entry_id", sa.String(length=64), nullable=False),
        sa.Column("window_s", sa.BigInteger(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("lifted_by", sa.String(length=64), nullable=False),
        sa.Column("lift_reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("decision_id"),
    )
    op.create_index("risk_decisions_by_time", "risk_decisions", ["decided_at"], unique=False)
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
    op.drop_index("risk_decisions_by_time", table_name="risk_decisions")
    op.drop_table("risk_decisions")
    op.drop_index("risk_changes_by_status", table_name="risk_changes")
    op.drop_table("risk_changes")
    op.drop_table("quota_usage")
    op.drop_index(
        "qualifications_one_per_order",
        table_name="qualifications",
        postgresql_where=sa.text("status IN ('LOCKED', 'USED')"),
    )
    op.drop_index(
        "qualifications_due",
        table_name="qualifications",
        postgresql_where=sa.text("status = 'AVAILABLE'"),
    )
    op.drop_index("qualifications_by_order", table_name="qualifications")
    op.drop_index("qualifications_by_consumer", table_name="qualifications")
    op.drop_table("qualifications")
    op.drop_table("qualification_availability")
    op.drop_table("policies")
    op.drop_table("persons")
    op.drop_index(op.f("ix_person_members_person_id"), table_name="person_members")
    op.drop_table("person_members")
    op.drop_table("person_keys")
    op.drop_table("person_held_when_linked")
    op.drop_table("identity_failures")
    op.drop_index(op.f("ix_consumers_phone_index"), table_name="consumers")
    op.drop_table("consumers")
    op.drop_table("consumer_platforms")
    op.drop_index("consumer_identifiers_by_consumer", table_name="consumer_identifiers")
    op.drop_table("consumer_identifiers")
    op.drop_table("consumer_erasures")
    op.drop_table("streams")
    op.drop_table("handled_events")
    op.drop_index("events_global_order", table_name="events")
    op.drop_table("events")
    op.drop_table("checkpoints")
