"""Idempotent complaints: a case keeps the SHA-256 of the text it was opened with.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``cases.text_sha256`` lets a complaint filed again under the platform's ``complaint_id`` be told
apart from a different complaint reusing that id. Added with an empty default, then filled from
the ``CaseOpened`` events of the service's own log (the digest was always recorded there), so a
case opened before this revision compares like one opened after (expand, then backfill).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from subsidy.v1 import events_pb2

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "cases",
        sa.Column("text_sha256", sa.String(length=64), server_default="", nullable=False),
        if_not_exists=True,
    )
    conn = op.get_bind()
    opened = conn.execute(
        sa.text("SELECT envelope FROM events WHERE event_type = 'subsidy.v1.CaseOpened'")
    )
    for (raw,) in opened:
        env = events_pb2.EventEnvelope.FromString(raw)
        event = events_pb2.CaseOpened.FromString(env.payload)
        if event.text_sha256:
            conn.execute(
                sa.text("UPDATE cases SET text_sha256 = :d WHERE case_id = :c"),
                {"d": event.text_sha256, "c": event.case_id},
            )


def downgrade() -> None:
    op.drop_column("cases", "text_sha256")
