"""The tables of merchant settlement, on the ledger's metadata, and how events feed them.

Read models all (rebuilt from events alone): ``settlement_evidence`` (one row per evidenced
order, from ``EvidenceRecorded``), ``settlement_batches`` (from ``SettlementBatchCreated`` /
``Approved`` / ``Paid``), ``settlement_orders`` (the batch that included each order) and
``clawbacks`` (from ``ClawbackRecorded``; ``deducted_by`` set by the batch that deducts it).
A factory, like :mod:`.reconciliation_model`, so ``projections.py`` owns the metadata.
"""

from __future__ import annotations

import datetime as dt
from datetime import UTC
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Select,
    String,
    Table,
    and_,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Envelope
from subsidy.v1 import events_pb2 as ev

from . import settlement_domain as sd


class SettlementTables:
    """Settlement's tables on ``metadata``; ``reservations`` and ``captures`` (the bill's
    captures: when each order was captured, and refunded) are the ledger's."""

    def __init__(self, metadata: MetaData, reservations: Table, captures: Table) -> None:
        self.reservations = reservations
        self.captures = captures
        self.evidence = Table(
            "settlement_evidence",
            metadata,
            Column("order_id", String(64), primary_key=True),
            Column("merchant_id", String(64), nullable=False, index=True),
            Column("kind", String(16), nullable=False),
            Column("reference", String(128), nullable=False),
            Column("serial", String(64), nullable=False),
            Column("evidenced_at", DateTime(timezone=True), nullable=True),
            Column("recorded_at", DateTime(timezone=True), nullable=False),
        )
        self.batches = Table(
            "settlement_batches",
            metadata,
            Column("batch_id", String(64), primary_key=True),
            Column("merchant_id", String(64), nullable=False, index=True),
            Column("status", String(16), nullable=False),
            Column("created_by", String(128), nullable=False),
            Column("approved_by", String(128), nullable=False, default=""),
            Column("period_from", DateTime(timezone=True), nullable=False),
            Column("period_to", DateTime(timezone=True), nullable=False),
            Column("gross_fen", BigInteger, nullable=False),
            Column("clawback_fen", BigInteger, nullable=False),
            Column("net_fen", BigInteger, nullable=False),
            Column("payment_ref", String(128), nullable=False, default=""),
            Column("lines", JSON, nullable=False),  # [[order_id, subsidy_fen], ...]
            Column("clawbacks", JSON, nullable=False),  # [[order_id, fen], ...]
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
        self.orders = Table(
            "settlement_orders",
            metadata,
            Column("order_id", String(64), primary_key=True),
            Column("batch_id", String(64), nullable=False),
        )
        self.clawbacks = Table(
            "clawbacks",
            metadata,
            Column("order_id", String(64), primary_key=True),
            Column("merchant_id", String(64), nullable=False, index=True),
            Column("fen", BigInteger, nullable=False),
            Column("batch_id", String(64), nullable=False),
            Column("deducted_by", String(64), nullable=False, default=""),
            Column("recorded_at", DateTime(timezone=True), nullable=False),
        )

    @property
    def read_models(self) -> tuple[Table, ...]:
        return (self.evidence, self.batches, self.orders, self.clawbacks)


def _at(env: Envelope) -> dt.datetime:
    return env.occurred_at.ToDatetime(tzinfo=UTC)


async def apply_event(
    conn: AsyncConnection, t: SettlementTables, env: Envelope, event: Message
) -> bool:
    """Apply a settlement event; returns whether ``event`` was one (nothing else to do)."""
    if isinstance(event, ev.EvidenceRecorded):
        evidenced = (
            event.evidenced_at.ToDatetime(tzinfo=UTC) if event.HasField("evidenced_at") else None
        )
        await conn.execute(
            insert(t.evidence).values(
                order_id=event.order_id,
                merchant_id=event.merchant_id,
                kind=event.kind,
                reference=event.reference,
                serial=event.serial,
                evidenced_at=evidenced,
                recorded_at=_at(env),
            )
        )
        return True
    if isinstance(event, ev.SettlementBatchCreated):
        await conn.execute(
            insert(t.batches).values(
                batch_id=event.batch_id,
                merchant_id=event.merchant_id,
                status=sd.CREATED,
                created_by=env.actor.id,
                approved_by="",
                period_from=event.period_from.ToDatetime(tzinfo=UTC),
                period_to=event.period_to.ToDatetime(tzinfo=UTC),
                gross_fen=event.gross_fen,
                clawback_fen=event.clawback_fen,
                net_fen=event.net_fen,
                payment_ref="",
                lines=[[line.order_id, line.subsidy_fen] for line in event.lines],
                clawbacks=[[c.order_id, c.fen] for c in event.clawbacks],
                created_at=_at(env),
            )
        )
        if event.lines:
            await conn.execute(
                insert(t.orders),
                [{"order_id": line.order_id, "batch_id": event.batch_id} for line in event.lines],
            )
        for c in event.clawbacks:
            await conn.execute(
                update(t.clawbacks)
                .where(and_(t.clawbacks.c.order_id == c.order_id, t.clawbacks.c.deducted_by == ""))
                .values(deducted_by=event.batch_id)
            )
        return True
    if isinstance(event, ev.SettlementBatchApproved):
        await conn.execute(
            update(t.batches)
            .where(t.batches.c.batch_id == event.batch_id)
            .values(status=sd.APPROVED, approved_by=env.actor.id)
        )
        return True
    if isinstance(event, ev.SettlementBatchPaid):
        await conn.execute(
            update(t.batches)
            .where(t.batches.c.batch_id == event.batch_id)
            .values(status=sd.PAID, payment_ref=event.payment_ref)
        )
        return True
    if isinstance(event, ev.ClawbackRecorded):
        await conn.execute(
            insert(t.clawbacks).values(
                order_id=event.order_id,
                merchant_id=event.merchant_id,
                fen=event.fen,
                batch_id=event.batch_id,
                deducted_by="",
                recorded_at=_at(env),
            )
        )
        return True
    return False


def _capture_query(t: SettlementTables) -> Select[Any]:
    r, c, e, o = t.reservations, t.captures, t.evidence, t.orders
    return select(
        r.c.order_id,
        r.c.merchant_id,
        r.c.subsidy_fen,
        r.c.serial,
        r.c.status,
        c.c.captured_at,
        e.c.kind,
        e.c.reference,
        e.c.serial.label("evidence_serial"),
        o.c.batch_id,
    ).select_from(
        r.join(c, c.c.order_id == r.c.order_id)
        .outerjoin(e, e.c.order_id == r.c.order_id)
        .outerjoin(o, o.c.order_id == r.c.order_id)
    )


def _capture(row: object) -> sd.Capture:
    m = row._mapping  # type: ignore[attr-defined]
    evidence = sd.Evidence(m["kind"], m["reference"], m["evidence_serial"]) if m["kind"] else None
    return sd.Capture(
        m["order_id"],
        m["merchant_id"],
        m["subsidy_fen"],
        m["captured_at"],
        serial=m["serial"],
        refunded=m["status"] != "CAPTURED",
        evidence=evidence,
        batch_id=m["batch_id"] or "",
    )


async def load_capture(
    conn: AsyncConnection, t: SettlementTables, order_id: str
) -> sd.Capture | None:
    """A captured (or captured then refunded) order as settlement sees it; None otherwise."""
    row = (
        await conn.execute(_capture_query(t).where(t.reservations.c.order_id == order_id))
    ).first()
    return _capture(row) if row is not None else None


async def load_payable(
    conn: AsyncConnection,
    t: SettlementTables,
    merchant_id: str,
    start: dt.datetime,
    end: dt.datetime,
) -> list[sd.Capture]:
    """The merchant's captures of [start, end) still captured and in no batch."""
    rows = await conn.execute(
        _capture_query(t)
        .where(t.reservations.c.merchant_id == merchant_id)
        .where(t.reservations.c.status == "CAPTURED")
        .where(t.captures.c.captured_at >= start)
        .where(t.captures.c.captured_at < end)
        .where(t.orders.c.batch_id.is_(None))
    )
    return [_capture(row) for row in rows]


async def load_clawbacks(
    conn: AsyncConnection, t: SettlementTables, merchant_id: str
) -> list[sd.Clawback]:
    """The merchant's outstanding clawbacks (receivables), in the order they were recorded."""
    rows = await conn.execute(
        select(t.clawbacks)
        .where(t.clawbacks.c.merchant_id == merchant_id)
        .where(t.clawbacks.c.deducted_by == "")
        .order_by(t.clawbacks.c.recorded_at, t.clawbacks.c.order_id)
    )
    return [sd.Clawback(r.order_id, r.merchant_id, r.fen, r.batch_id, r.deducted_by) for r in rows]


async def load_batch(conn: AsyncConnection, t: SettlementTables, batch_id: str) -> sd.Batch | None:
    row = (await conn.execute(select(t.batches).where(t.batches.c.batch_id == batch_id))).first()
    if row is None:
        return None
    return sd.Batch(
        row.batch_id,
        row.merchant_id,
        row.status,
        row.created_by,
        row.net_fen,
        tuple(o for o, _ in row.lines),
        tuple(o for o, _ in row.clawbacks),
        row.payment_ref,
    )


async def batch_row(
    conn: AsyncConnection, t: SettlementTables, batch_id: str
) -> dict[str, object] | None:
    row = (await conn.execute(select(t.batches).where(t.batches.c.batch_id == batch_id))).first()
    return dict(row._mapping) if row is not None else None


async def load_unevidenced(
    conn: AsyncConnection,
    t: SettlementTables,
    merchant_id: str,
    before: dt.datetime,
    limit: int,
    after: sd.Cursor | None = None,
) -> list[dict[str, Any]]:
    """Captured orders without evidence captured before ``before``, oldest first (then by
    order id), after the cursor ``after`` when given."""
    r, c, e = t.reservations, t.captures, t.evidence
    query = (
        select(
            r.c.order_id,
            r.c.merchant_id,
            r.c.platform_id,
            r.c.subsidy_fen,
            r.c.policy_version,
            c.c.captured_at,
        )
        .select_from(
            r.join(c, c.c.order_id == r.c.order_id).outerjoin(e, e.c.order_id == r.c.order_id)
        )
        .where(r.c.status == "CAPTURED")
        .where(e.c.order_id.is_(None))
        .where(c.c.captured_at < before)
        .order_by(c.c.captured_at, r.c.order_id)
        .limit(limit)
    )
    if merchant_id:
        query = query.where(r.c.merchant_id == merchant_id)
    if after is not None:
        query = query.where(tuple_(c.c.captured_at, r.c.order_id) > tuple_(*after))
    return [dict(row._mapping) for row in await conn.execute(query)]


async def load_batches(
    conn: AsyncConnection, t: SettlementTables, merchant_id: str, after: str, limit: int
) -> list[dict[str, Any]]:
    """The batches whose id follows ``after`` (all: ""), by batch id, at most ``limit``."""
    query = select(t.batches).where(t.batches.c.batch_id > after)
    if merchant_id:
        query = query.where(t.batches.c.merchant_id == merchant_id)
    query = query.order_by(t.batches.c.batch_id).limit(limit)
    return [dict(row._mapping) for row in await conn.execute(query)]


async def load_returns(
    conn: AsyncConnection,
    t: SettlementTables,
    merchant_id: str,
    limit: int,
    after: tuple[dt.datetime, str] | None = None,
) -> list[dict[str, Any]]:
    """The returns ledger: every refund of a captured order, newest first, with its clawback
    (those after ``after``, the last (refunded at, order id) of the page before)."""
    r, c, o, k = t.reservations, t.captures, t.orders, t.clawbacks
    query = (
        select(
            r.c.order_id,
            r.c.merchant_id,
            r.c.platform_id,
            r.c.sku,
            r.c.subsidy_fen,
            c.c.captured_at,
            c.c.refunded_at,
            o.c.batch_id,
            k.c.fen.label("clawback_fen"),
            k.c.deducted_by,
        )
        .select_from(
            r.join(c, c.c.order_id == r.c.order_id)
            .outerjoin(o, o.c.order_id == r.c.order_id)
            .outerjoin(k, k.c.order_id == r.c.order_id)
        )
        .where(c.c.refunded_at.is_not(None))
        .order_by(c.c.refunded_at.desc(), r.c.order_id)
        .limit(limit)
    )
    if merchant_id:
        query = query.where(r.c.merchant_id == merchant_id)
    if after is not None:
        at, order_id = after
        query = query.where(
            or_(c.c.refunded_at < at, and_(c.c.refunded_at == at, r.c.order_id > order_id))
        )
    return [dict(row._mapping) for row in await conn.execute(query)]
