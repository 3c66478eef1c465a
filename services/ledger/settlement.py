"""Ledger use cases of merchant settlement: evidence, batches (maker-checker), clawbacks.

Evidence is decided under the order's pool lock (as its capture and its refund are), so an order
is never evidenced after its refund. A merchant's batches and clawbacks share the stream
``settlement/{merchant_id}``: creating a batch locks it, and so does the refund of a captured
order (after the pool's lock, always in that order), so a refund either comes before the batch
(which then leaves the order out) or after it (and is then clawed back), never in between.
Part of :class:`services.ledger.handlers.Ledger`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.contract.budget import pool_stream
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Pipeline
from subsidy.v1 import common_pb2

from . import domain
from . import settlement_domain as sd
from . import settlement_model as model
from .policies import FundingPolicies
from .projections import reservations, settlement_tables

T = settlement_tables
OVERDUE_CHUNK = 1_000  # unevidenced captures read per statement
OVERDUE_SCAN = 10_000  # and at most this many per ListOverdueEvidence call
BatchDecision = Callable[[sd.Batch | None], Sequence[Message]]


@dataclass(frozen=True)
class EvidenceKey:
    pool_id: str
    order_id: str


@dataclass(frozen=True)
class MerchantKey:
    merchant_id: str
    batch_id: str = ""
    cmd: sd.CreateBatch | None = None  # a creation: load what the batch may pay
    order_id: str = ""  # a refund: load the order as settlement sees it


@dataclass(frozen=True)
class Merchant:
    """A merchant's settlement as a batch decision sees it under the merchant's lock."""

    batch: sd.Batch | None
    payable: tuple[sd.Capture, ...] = ()
    clawbacks: tuple[sd.Clawback, ...] = ()
    capture: sd.Capture | None = None


async def _load_evidence(conn: AsyncConnection, key: EvidenceKey) -> sd.Capture | None:
    return await model.load_capture(conn, T, key.order_id)


async def _load_merchant(conn: AsyncConnection, key: MerchantKey) -> Merchant:
    batch = await model.load_batch(conn, T, key.batch_id) if key.batch_id else None
    if key.order_id:  # read under the merchant's lock: a batch made meanwhile is seen
        return Merchant(batch, capture=await model.load_capture(conn, T, key.order_id))
    if key.cmd is None:
        return Merchant(batch)
    c = key.cmd
    payable = await model.load_payable(conn, T, c.merchant_id, c.period_from, c.period_to)
    clawbacks = await model.load_clawbacks(conn, T, c.merchant_id)
    return Merchant(batch, tuple(payable), tuple(clawbacks))


EVIDENCE: Aggregate[EvidenceKey, sd.Capture] = Aggregate(
    "budget-pool", lambda k: pool_stream(k.pool_id), _load_evidence
)
MERCHANT: Aggregate[MerchantKey, Merchant] = Aggregate(
    "settlement", lambda k: f"settlement/{k.merchant_id}", _load_merchant
)


def _merchant(state: Merchant | None) -> Merchant:
    assert state is not None  # _load_merchant always answers
    return state


class SettlementUseCases:
    """Evidence and settlement batches; the store and pipeline come from the Ledger."""

    store: EventStore
    pipeline: Pipeline
    policies: FundingPolicies
    clock: Callable[[], datetime]

    async def overdue_evidence(
        self, merchant_id: str, limit: int, after: sd.Cursor | None = None
    ) -> tuple[list[dict[str, Any]], sd.Cursor | None]:
        """Captured orders without evidence past their policy version's ``evidence_days``,
        oldest first, at most ``limit`` after the cursor ``after``; and the cursor of the next
        page (None: no more). One call scans at most OVERDUE_SCAN unevidenced captures (in
        chunks), so a page may be short of ``limit`` and still have a next one."""
        now = self.clock()
        scanned: list[tuple[sd.Capture, int]] = []
        rows: dict[str, dict[str, Any]] = {}
        complete, late = False, 0
        async with self.store.engine.connect() as conn:
            # One more than a page: whether a next page exists is known without an empty one.
            while len(scanned) < OVERDUE_SCAN and late <= limit:
                # No version allows less than a day: anything younger cannot be late.
                chunk = await model.load_unevidenced(
                    conn, T, merchant_id, now - timedelta(days=1), OVERDUE_CHUNK, after
                )
                for row in chunk:
                    days = (await self.policies.rules(str(row["policy_version"]))).evidence_days
                    capture = sd.Capture(row["order_id"], row["merchant_id"], 0, row["captured_at"])
                    scanned.append((capture, days))
                    late += len(sd.overdue([capture], now, days))
                    rows[capture.order_id] = row | {
                        "due_at": row["captured_at"] + timedelta(days=days)
                    }
                if len(chunk) < OVERDUE_CHUNK:
                    complete = True
                    break
                after = (chunk[-1]["captured_at"], chunk[-1]["order_id"])
        page, cursor = sd.overdue_page(scanned, now, limit, complete)
        return [rows[c.order_id] for c in page], cursor

    async def returns(
        self, merchant_id: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[dict[str, Any]]:
        """The returns ledger (退换货台账): every refund of a captured order, newest first
        (after ``after``: the last refund time and order id of the page before)."""
        async with self.store.engine.connect() as conn:
            return await model.load_returns(conn, T, merchant_id, limit, after)

    async def settlement_batches(
        self, merchant_id: str, after: str, limit: int
    ) -> list[dict[str, Any]]:
        """The settlement batches after batch id ``after``, by batch id."""
        async with self.store.engine.connect() as conn:
            return await model.load_batches(conn, T, merchant_id, after, limit)

    async def record_evidence(
        self, cmd: sd.RecordEvidence, actor: common_pb2.Actor, platform: str | None
    ) -> dict[str, Any]:
        """Record a captured order's delivery or activation evidence (a platform: its own)."""
        async with self.store.engine.connect() as conn:
            query = select(reservations.c.pool_id, reservations.c.platform_id).where(
                reservations.c.order_id == cmd.order_id
            )
            found = (await conn.execute(query)).first()
        if found is None or (platform is not None and found.platform_id != platform):
            raise domain.unknown_order(cmd.order_id)  # another platform's order is unknown
        ctx = Context(actor, correlation_id=cmd.order_id)
        async with self.store.transaction() as tx:
            await self.pipeline.run(
                EVIDENCE,
                EvidenceKey(found.pool_id, cmd.order_id),
                lambda capture: sd.record_evidence(capture, cmd),
                ctx,
                tx=tx,
                reload=False,
            )
            row = (
                await tx.conn.execute(
                    select(T.evidence).where(T.evidence.c.order_id == cmd.order_id)
                )
            ).first()
        assert row is not None
        return dict(row._mapping)

    async def claw_back(self, tx: Tx, order_id: str, merchant_id: str, ctx: Context) -> None:
        """After a refund of a captured order (in its transaction, under its pool's lock): a
        clawback when a batch included the order. The merchant's settlement stream is locked
        before the order is read, always: a batch being made now either commits first (and is
        seen) or waits for this refund (and leaves the order out)."""
        await self.pipeline.run(
            MERCHANT,
            MerchantKey(merchant_id, order_id=order_id),
            lambda state: sd.clawback(_merchant(state).capture),
            ctx,
            tx=tx,
            reload=False,
        )

    async def create_batch(self, cmd: sd.CreateBatch, actor: common_pb2.Actor) -> dict[str, object]:
        """An operator makes a merchant's batch for a period; nothing is owed until approved."""
        key = MerchantKey(cmd.merchant_id, cmd.batch_id, cmd)
        ctx = Context(actor, correlation_id=cmd.batch_id)
        async with self.store.transaction() as tx:
            await self.pipeline.run(
                MERCHANT,
                key,
                lambda state: sd.create_batch(
                    _merchant(state).batch,
                    _merchant(state).payable,
                    _merchant(state).clawbacks,
                    cmd,
                ),
                ctx,
                tx=tx,
                reload=False,
            )
            return await self._batch_row(tx.conn, cmd.batch_id)

    async def _batch_row(self, conn: AsyncConnection, batch_id: str) -> dict[str, object]:
        row = await model.batch_row(conn, T, batch_id)
        if row is None:
            raise sd.unknown_batch(batch_id)
        return row

    async def _on_batch(
        self, batch_id: str, actor: common_pb2.Actor, decide: BatchDecision
    ) -> dict[str, object]:
        async with self.store.engine.connect() as conn:
            found = await self._batch_row(conn, batch_id)
        ctx = Context(actor, correlation_id=batch_id)
        async with self.store.transaction() as tx:
            await self.pipeline.run(
                MERCHANT,
                MerchantKey(str(found["merchant_id"]), batch_id),
                lambda state: decide(_merchant(state).batch),
                ctx,
                tx=tx,
                reload=False,
            )
            return await self._batch_row(tx.conn, batch_id)

    async def approve_batch(self, batch_id: str, actor: common_pb2.Actor) -> dict[str, object]:
        """A different approver approves the batch; from then on it never changes."""
        return await self._on_batch(
            batch_id, actor, lambda batch: sd.approve_batch(batch, batch_id, actor.id)
        )

    async def mark_batch_paid(
        self, batch_id: str, payment_ref: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        """An approved batch was paid by the transfer ``payment_ref``."""
        return await self._on_batch(
            batch_id, actor, lambda batch: sd.mark_paid(batch, batch_id, payment_ref)
        )

    async def settlement_batch(self, batch_id: str) -> dict[str, object]:
        async with self.store.engine.connect() as conn:
            return await self._batch_row(conn, batch_id)
