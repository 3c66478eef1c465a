"""The tables of discount-bill reconciliation, on the ledger's metadata, and how events feed them.

- ``bill_captures`` (read model): every captured subsidy as a bill should list it (order id,
  its platform, payment reference, subsidy, when captured, when refunded; an item of a
  multi-item order under its order's ``bill_order_id``, added up when matched), from
  ``SubsidyCaptured`` and ``SubsidyReleased`` (after capture: a refund);
- ``reconciliations`` (read model): one row per reconciled bill, from ``DiscountBillReconciled``;
- ``reconciliation_lines``: the report's lines of each reconciled bill, written in the same
  transaction as its event. They come from the bill, which is not in the log, so they are not a
  read model (a rebuild keeps them); the event's ``lines_sha256`` and counts check them. The
  runtime role may only add lines, never change a recorded report.

A factory rather than module-level tables, so ``projections.py`` can own the metadata and call
:func:`apply_event` without an import cycle.
"""

from __future__ import annotations

from datetime import UTC

from google.protobuf.message import Message
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.contract import order_line
from services.kernel.events import Envelope
from services.kernel.eventstore import APPEND_ONLY, GRANTS
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev


class ReconciliationTables:
    """The reconciliation's tables on ``metadata`` (the ledger's); ``reservations`` is the
    ledger's reservations read model (a capture's platform is its reservation's)."""

    def __init__(self, metadata: MetaData, reservations: Table) -> None:
        self.reservations = reservations
        self.captures = Table(
            "bill_captures",
            metadata,
            Column("order_id", String(64), primary_key=True),
            Column("platform_id", String(64), nullable=False),
            Column("payment_ref", String(128), nullable=False),
            Column("subsidy_fen", BigInteger, nullable=False),
            Column("captured_at", DateTime(timezone=True), nullable=False, index=True),
            Column("refunded_at", DateTime(timezone=True), nullable=True),
            # The order the bill lists it under: the order itself, or the order an item of a
            # multi-item order belongs to (the bill has one row per order, all items summed).
            Column("bill_order_id", String(64), nullable=False, index=True),
        )
        self.reconciliations = Table(
            "reconciliations",
            metadata,
            Column("file_sha256", String(64), primary_key=True),
            Column("reconciled_at", DateTime(timezone=True), nullable=False, index=True),
            Column("reconciled_by", String(64), nullable=False),
            Column("reason", String(500), nullable=False),
            Column("event", LargeBinary, nullable=False),  # the DiscountBillReconciled payload
        )
        self.lines = Table(
            "reconciliation_lines",
            metadata,
            Column("file_sha256", String(64), primary_key=True),
            Column("seq", Integer, primary_key=True),
            Column("kind", String(24), nullable=False),
            Column("line", BigInteger, nullable=False),
            Column("order_id", String(64), nullable=False),
            Column("bill_payment_ref", String(128), nullable=False),
            Column("ledger_payment_ref", String(128), nullable=False),
            Column("bill_fen", BigInteger, nullable=False),
            Column("ledger_fen", BigInteger, nullable=False),
            Column("paid_at", DateTime(timezone=True), nullable=True),
            Column("captured_at", DateTime(timezone=True), nullable=True),
            Column("ledger_status", String(16), nullable=False),
            Column("first_line", BigInteger, nullable=False),
            info={GRANTS: APPEND_ONLY},
        )
        # A checkout's writes here, compiled once (services.kernel.sql).
        c = self.captures.c
        self.capture_insert = Statement(
            insert(self.captures).values(
                {k: bindparam(k) for k in (col.name for col in self.captures.c)}
            ),
            name="bill_capture_insert",
        )
        self.capture_refunded = Statement(
            update(self.captures)
            .where(c.order_id == bindparam("order_id"))
            .values(refunded_at=bindparam("refunded_at")),
            name="bill_capture_refunded",
        )

    @property
    def read_models(self) -> tuple[Table, ...]:
        """What a rebuild empties and replays (not the kept lines)."""
        return (self.captures, self.reconciliations)


async def capture_row(
    conn: AsyncConnection,
    t: ReconciliationTables,
    env: Envelope,
    event: ev.SubsidyCaptured,
    platform: str | None = None,
) -> dict[str, object]:
    """The ``bill_captures`` row a capture writes (``capture_insert``'s parameters; the
    reservation's platform read when the command did not hand it over)."""
    if platform is None:
        # Its reservation's row is there: SubsidyReserved came first in the pool's stream.
        platform = await conn.scalar(
            select(t.reservations.c.platform_id).where(t.reservations.c.order_id == event.order_id)
        )
    return {
        "order_id": event.order_id,
        "platform_id": platform or "",
        "payment_ref": event.payment_ref,
        "subsidy_fen": event.subsidy_fen,
        "captured_at": env.occurred_at.ToDatetime(tzinfo=UTC),
        "refunded_at": None,
        "bill_order_id": order_line.order_of(event.order_id),
    }


async def apply_event(
    conn: AsyncConnection,
    t: ReconciliationTables,
    env: Envelope,
    event: Message,
    platform: str | None = None,
) -> None:
    """Apply one ledger event to the reconciliation's read models (``platform``: a captured
    reservation's, when its command already read it under the lock)."""
    at = env.occurred_at.ToDatetime(tzinfo=UTC)
    if isinstance(event, ev.SubsidyCaptured):
        await t.capture_insert.run(conn, **await capture_row(conn, t, env, event, platform))
    elif isinstance(event, ev.SubsidyReleased) and event.was_captured:
        await t.capture_refunded.run(conn, order_id=event.order_id, refunded_at=at)
    elif isinstance(event, ev.DiscountBillReconciled):
        await conn.execute(
            insert(t.reconciliations).values(
                file_sha256=event.file_sha256,
                reconciled_at=at,
                reconciled_by=env.actor.id,
                reason=env.actor.reason,
                event=event.SerializeToString(deterministic=True),
            )
        )
