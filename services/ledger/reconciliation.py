"""Discount-bill reconciliation (立减账单核对): the ledger's use cases.

``reconcile`` takes the whole bill (the edge assembles its chunks), checks every row
(``reconcile.read_bill``), loads the captures the bill is compared with, matches them
(``reconcile.match``) and records ``DiscountBillReconciled`` in the stream
``discount-bill/<file_sha256>`` with the report's lines, in one transaction. The same file again
finds its stream and answers with what was recorded: no second event, the same answer (the
lines are read back, not recomputed, so a later capture or refund cannot change an answer
given). It yields progress, the report's lines in batches, then the answer, so the edge can
stream them within gRPC's message limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import RowMapping, String, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.errors import NotFound
from services.kernel.events import Context
from services.kernel.eventstore import EventStore
from services.kernel.pipeline import Aggregate, Pipeline
from subsidy.v1 import events_pb2 as ev

from . import reconcile as bill
from .projections import reconciliation_tables as tables
from .projections import reservations

BATCH: Final = 2000  # report lines per streamed message, and per insert
MAX_LIST: Final = 500


@dataclass(frozen=True)
class Recorded:
    """A reconciliation on record: its event and who made it when, why."""

    event: ev.DiscountBillReconciled
    reconciled_by: str
    reconciled_at: datetime
    reason: str

    @property
    def state(self) -> bill.Reconciled:
        found = bill.evolve(None, self.event)
        assert found is not None
        return found


@dataclass(frozen=True)
class Progress:
    """One step of a reconciliation, as the edge streams it."""

    phase: str  # VALIDATE, MATCH, RECORD, REPORT, DONE
    done: int
    total: int
    file_sha256: str
    lines: tuple[bill.Discrepancy, ...] = ()
    recorded: Recorded | None = None  # DONE
    already_reconciled: bool = False
    rejected: tuple[bill.RowError, ...] = ()
    rejected_rows: int = 0


def stream_of(file_sha256: str) -> str:
    return f"discount-bill/{file_sha256}"


async def _load(conn: AsyncConnection, file_sha256: str) -> bill.Reconciled | None:
    found = await _recorded(conn, file_sha256)
    return found.state if found is not None else None


RECONCILIATION: Final[Aggregate[str, bill.Reconciled]] = Aggregate(
    "discount-bill", stream_of, _load
)


async def _recorded(conn: AsyncConnection, file_sha256: str) -> Recorded | None:
    t = tables.reconciliations
    row = (await conn.execute(select(t).where(t.c.file_sha256 == file_sha256))).first()
    return _as_recorded(row._mapping) if row is not None else None


def _as_recorded(row: RowMapping) -> Recorded:
    return Recorded(
        ev.DiscountBillReconciled.FromString(row["event"]),
        row["reconciled_by"],
        row["reconciled_at"],
        row["reason"],
    )


def _any_of(order_ids: Sequence[str]) -> object:
    # One array parameter, not one per id: a bill of 100,000 orders is over PostgreSQL's
    # 32,767 parameters per statement.
    return any_(bindparam("order_ids", list(order_ids), type_=ARRAY(String)))


async def _captures(
    conn: AsyncConnection, order_ids: Sequence[str], within: bill.Period, platform_id: str
) -> dict[str, bill.Capture]:
    """Every capture of an order the bill lists, and every unrefunded one of its period (of
    its platform, for one platform's bill), one per order (a multi-item order's items added
    up: reconcile.order_capture)."""
    t = tables.captures
    in_period = (
        select(t.c.bill_order_id)
        .where(t.c.captured_at >= within.start)
        .where(t.c.captured_at < within.end)
        .where(t.c.refunded_at.is_(None))
        .distinct()
    )
    if platform_id:
        in_period = in_period.where(t.c.platform_id == platform_id)
    wanted = set(order_ids) | set((await conn.execute(in_period)).scalars())
    # Every capture of those orders, refunded items too: an order's discount is all its items'.
    rows = await conn.execute(
        select(t)
        .where(t.c.bill_order_id == _any_of(sorted(wanted)))
        .order_by(t.c.bill_order_id, t.c.order_id)
    )
    lines: dict[str, list[bill.Capture]] = {}
    for r in rows:
        lines.setdefault(r.bill_order_id, []).append(
            bill.Capture(
                r.bill_order_id,
                r.payment_ref,
                r.subsidy_fen,
                r.captured_at,
                r.refunded_at is not None,
                r.platform_id,
            )
        )
    return {order_id: bill.order_capture(items) for order_id, items in lines.items()}


async def _statuses(conn: AsyncConnection, order_ids: Sequence[str]) -> dict[str, str]:
    """What the ledger knows of orders it has no capture of: PENDING, or how it was released."""
    r = reservations
    rows = await conn.execute(
        select(r.c.order_id, r.c.status, r.c.release_reason).where(
            r.c.order_id == _any_of(order_ids)
        )
    )
    return {o: (reason or status) for o, status, reason in rows}


def _line_row(file_sha256: str, seq: int, d: bill.Discrepancy) -> dict[str, object]:
    return {
        "file_sha256": file_sha256,
        "seq": seq,
        "kind": d.kind,
        "line": d.line,
        "order_id": d.order_id,
        "bill_payment_ref": d.bill_payment_ref,
        "ledger_payment_ref": d.ledger_payment_ref,
        "bill_fen": d.bill_fen,
        "ledger_fen": d.ledger_fen,
        "paid_at": d.paid_at,
        "captured_at": d.captured_at,
        "ledger_status": d.ledger_status,
        "first_line": d.first_line,
    }


def _aware(at: datetime | None) -> datetime | None:
    return at.astimezone(UTC) if at is not None else None


class Reconciliations:
    """Discount bills reconciled against the ledger's captures, once per file."""

    def __init__(self, store: EventStore, pipeline: Pipeline) -> None:
        self.store = store
        self.pipeline = pipeline

    async def reconcile(
        self,
        data: bytes,
        start: datetime | None,
        end: datetime | None,
        platform_id: str,
        ctx: Context,
    ) -> AsyncIterator[Progress]:
        """Reconcile one bill (``start``/``end``: the operator's period, or None;
        ``platform_id``: the one platform whose bill it is, or ""), or answer with its recorded
        reconciliation; a bill with malformed rows records nothing."""
        digest = bill.file_sha256(data)
        asked = (
            bill.Period(start.astimezone(UTC), end.astimezone(UTC))
            if start is not None and end is not None
            else None
        )
        async with self.store.engine.connect() as conn:
            prior = await _recorded(conn, digest)
        if prior is not None:
            bill.same_request(prior.state, asked, platform_id)
            async for step in self._answer(prior, already=True):
                yield step
            return
        yield Progress("VALIDATE", 0, 0, digest)
        # Off the event loop: a big bill must not stall the checkout calls this process serves.
        parsed = await asyncio.to_thread(bill.read_bill, data)
        total = parsed.total_rows
        yield Progress("VALIDATE", total, total, digest)
        if parsed.errors:
            yield Progress(
                "DONE",
                total,
                total,
                digest,
                rejected=tuple(parsed.errors),
                rejected_rows=parsed.bad_rows,
            )
            return
        within = bill.period(parsed.rows, start, end)
        order_ids = sorted({r.order_id for r in parsed.rows})
        yield Progress("MATCH", 0, total, digest)
        async with self.store.transaction() as tx:
            captures = await _captures(tx.conn, order_ids, within, platform_id)
            statuses = await _statuses(tx.conn, [o for o in order_ids if o not in captures])
            report = await asyncio.to_thread(
                bill.match, parsed.rows, captures, within, statuses, platform_id
            )
            yield Progress("MATCH", total, total, digest)
            cmd = bill.Reconcile(digest, len(data), report)
            outcome = await self.pipeline.run(
                RECONCILIATION, digest, lambda existing: bill.record(existing, cmd), ctx, tx=tx
            )
            lines = report.discrepancies
            if outcome.appended:
                for at in range(0, len(lines), BATCH):
                    batch = lines[at : at + BATCH]
                    await tx.conn.execute(
                        pg_insert(tables.lines),
                        [_line_row(digest, at + i, d) for i, d in enumerate(batch)],
                    )
                    yield Progress("RECORD", at + len(batch), len(lines), digest)
            recorded = await _recorded(tx.conn, digest)
        assert recorded is not None
        # Appended nothing: the same file was reconciled concurrently, and that is the answer.
        async for step in self._answer(recorded, already=not outcome.appended):
            yield step

    async def _answer(self, recorded: Recorded, *, already: bool) -> AsyncIterator[Progress]:
        digest = recorded.event.file_sha256
        total = recorded.event.discrepancies
        sent = 0
        async for batch in self.lines(digest):
            sent += len(batch)
            yield Progress("REPORT", sent, total, digest, lines=batch)
        yield Progress("DONE", total, total, digest, recorded=recorded, already_reconciled=already)

    async def lines(self, file_sha256: str) -> AsyncIterator[tuple[bill.Discrepancy, ...]]:
        """The report's lines of a recorded reconciliation, in order, in batches."""
        t = tables.lines
        seq = -1
        while True:
            async with self.store.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(t)
                        .where(t.c.file_sha256 == file_sha256)
                        .where(t.c.seq > seq)
                        .order_by(t.c.seq)
                        .limit(BATCH)
                    )
                ).all()
            if not rows:
                return
            seq = rows[-1].seq
            yield tuple(
                bill.Discrepancy(
                    kind=r.kind,
                    line=r.line,
                    order_id=r.order_id,
                    bill_payment_ref=r.bill_payment_ref,
                    ledger_payment_ref=r.ledger_payment_ref,
                    bill_fen=r.bill_fen,
                    ledger_fen=r.ledger_fen,
                    paid_at=_aware(r.paid_at),
                    captured_at=_aware(r.captured_at),
                    ledger_status=r.ledger_status,
                    first_line=r.first_line,
                )
                for r in rows
            )

    async def get(self, file_sha256: str) -> AsyncIterator[Progress]:
        """A recorded reconciliation and its report's lines, as ``reconcile`` answered."""
        async with self.store.engine.connect() as conn:
            found = await _recorded(conn, file_sha256)
        if found is None:
            raise NotFound(
                "UNKNOWN_RECONCILIATION",
                "file_sha256: no bill with this SHA-256 was reconciled",
                field="file_sha256",
            )
        async for step in self._answer(found, already=True):
            yield step

    async def recent(self, limit: int, offset: int) -> tuple[list[Recorded], int | None]:
        """Recorded reconciliations, newest first; and the offset of the next page, if any."""
        t = tables.reconciliations
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t)
                    .order_by(t.c.reconciled_at.desc(), t.c.file_sha256)
                    .offset(offset)
                    .limit(limit + 1)
                )
            ).all()
        more = len(rows) > limit
        return [_as_recorded(r._mapping) for r in rows[:limit]], (offset + limit if more else None)
