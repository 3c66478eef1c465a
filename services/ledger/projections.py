"""Ledger read models, fed by events: budget pools and reservations.

Handlers apply each event here in the same transaction as its append (so decisions read current
state); :func:`rebuild` drops them and replays the store, which must give identical rows.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import metrics
from services.kernel.contract import budget
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import EventStore
from subsidy.v1 import events_pb2 as ev

from . import domain
from . import reconciliation_model as reconciliation

metadata = MetaData()
SERIAL_CONSTRAINT = "reservations_one_subsidy_per_serial"

budget_pools = Table(
    "budget_pools",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("funded_fen", BigInteger, nullable=False),
    Column("available_fen", BigInteger, nullable=False),
    Column("reserved_fen", BigInteger, nullable=False),
    Column("spent_fen", BigInteger, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("pool_id", String(64), nullable=False),
    Column("platform_id", String(64), nullable=False),
    Column("consumer_id", String(64), nullable=False),
    Column("qualification_id", String(64), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("merchant_id", String(64), nullable=False),
    Column("category", String(64), nullable=False),
    Column("unit_price_fen", BigInteger, nullable=False),
    Column("subsidy_fen", BigInteger, nullable=False),
    Column("policy_version", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("release_reason", String(16), nullable=False, default=""),
    Column("payment_ref", String(128), nullable=False, default=""),
    Column("serial", String(64), nullable=False, default=""),
    Index("reservations_pending_expiry", "status", "expires_at"),
    # One subsidy per unit: a serial / IMEI can be held or spent by one order only. Enforced
    # here, under concurrency, not only by catalog's (asynchronous) view of the ledger's events.
    Index(
        SERIAL_CONSTRAINT,
        "serial",
        unique=True,
        postgresql_where=text("serial <> '' AND status IN ('PENDING', 'CAPTURED')"),
    ),
)

# Not a read model: the reservations in flight between locking the qualification and the hold.
# A row outliving its attempt (the ledger crashed) is how the sweeper finds the lock to undo.
reservation_attempts = Table(
    "reservation_attempts",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("pool_id", String(64), nullable=False),
    Column("qualification_id", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
)

funding_proposals = Table(
    "funding_proposals",
    metadata,
    Column("proposal_id", String(200), primary_key=True),
    Column("pool_id", String(64), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("source", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("proposed_by", String(64), nullable=False),
    Column("approved_by", String(64), nullable=False),
    Column("platform_ids", String(2000), nullable=False, default=""),
)

# The platforms each pool serves (PoolAssigned): a platform reaches only these pools.
pool_platforms = Table(
    "pool_platforms",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("platform_id", String(64), primary_key=True),
)

funding_keys = Table(
    "funding_keys",
    metadata,
    Column("idempotency_key", String(128), primary_key=True),
    Column("pool_id", String(64), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
)

# Discount-bill reconciliation: its captures, reconciliations and kept report lines.
reconciliation_tables = reconciliation.ReconciliationTables(metadata, reservations)


def refusal_stream(order_id: str) -> str:
    return f"refusal/{order_id}"


async def load_pool(conn: AsyncConnection, pool_id: str) -> budget.Pool | None:
    row = (
        await conn.execute(select(budget_pools).where(budget_pools.c.pool_id == pool_id))
    ).first()
    if row is None:
        return None
    return budget.Pool(pool_id, row.funded_fen, row.available_fen, row.reserved_fen, row.spent_fen)


async def load_reservation(conn: AsyncConnection, order_id: str) -> domain.Reservation | None:
    row = (
        await conn.execute(
            select(
                reservations.c.order_id,
                reservations.c.pool_id,
                reservations.c.subsidy_fen,
                reservations.c.status,
                reservations.c.qualification_id,
            ).where(reservations.c.order_id == order_id)
        )
    ).first()
    return domain.Reservation(*row) if row is not None else None


async def load_proposal(conn: AsyncConnection, proposal_id: str) -> domain.FundingProposal | None:
    row = (
        await conn.execute(
            select(funding_proposals).where(funding_proposals.c.proposal_id == proposal_id)
        )
    ).first()
    if row is None:
        return None
    values = dict(row._mapping)
    values["platform_ids"] = tuple(p for p in values["platform_ids"].split(",") if p)
    return domain.FundingProposal(**values)


async def load_pool_platforms(conn: AsyncConnection, pool_id: str) -> frozenset[str]:
    rows = await conn.execute(
        select(pool_platforms.c.platform_id).where(pool_platforms.c.pool_id == pool_id)
    )
    return frozenset(rows.scalars())


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one ledger event to the read models."""
    event = payload_of(env)
    await reconciliation.apply_event(conn, reconciliation_tables, env, event)
    if isinstance(event, ev.FundingProposed | ev.FundingApproved):
        known = await load_proposal(conn, event.proposal_id)
        proposal = domain.evolve_proposal(known, event, env.actor.id)
        assert proposal is not None
        values = asdict(proposal)
        values["platform_ids"] = ",".join(proposal.platform_ids)
        if known is None:
            await conn.execute(insert(funding_proposals).values(**values))
        else:
            await conn.execute(
                update(funding_proposals)
                .where(funding_proposals.c.proposal_id == event.proposal_id)
                .values(**values)
            )
        return
    if isinstance(event, ev.PoolAssigned):
        await conn.execute(
            insert(pool_platforms).values(pool_id=event.pool_id, platform_id=event.platform_id)
        )
        return
    if isinstance(event, ev.ReservationRefused):
        metrics.RESERVATIONS.labels("refused").inc()
        return  # the budget did not move
    pool_id = getattr(event, "pool_id", "")
    if not pool_id:
        return
    before = await load_pool(conn, pool_id)
    after = budget.apply(before or budget.Pool(pool_id), event)
    values = {
        "funded_fen": after.funded,
        "available_fen": after.available,
        "reserved_fen": after.reserved,
        "spent_fen": after.spent,
    }
    for bucket, fen in values.items():
        metrics.BUDGET.labels(pool_id, bucket.removesuffix("_fen")).set(fen)
    if isinstance(event, ev.SubsidyReserved):
        metrics.RESERVATIONS.labels("reserved").inc()
    elif isinstance(event, ev.SubsidyCaptured):
        metrics.RESERVATIONS.labels("captured").inc()
    elif isinstance(event, ev.SubsidyReleased):
        metrics.RESERVATIONS.labels(f"released_{event.reason.lower()}").inc()
    if before is None:
        await conn.execute(insert(budget_pools).values(pool_id=pool_id, **values))
    else:
        await conn.execute(
            update(budget_pools).where(budget_pools.c.pool_id == pool_id).values(**values)
        )
    if isinstance(event, ev.BudgetFunded) and event.idempotency_key:
        await conn.execute(
            insert(funding_keys).values(
                idempotency_key=event.idempotency_key, pool_id=pool_id, amount_fen=event.amount_fen
            )
        )
    elif isinstance(event, ev.SubsidyReserved):
        await conn.execute(
            insert(reservations).values(
                order_id=event.order_id,
                pool_id=event.pool_id,
                platform_id=event.platform_id,
                consumer_id=event.consumer_id,
                qualification_id=event.qualification_id,
                sku=event.sku,
                merchant_id=event.merchant_id,
                category=event.category,
                unit_price_fen=event.unit_price_fen,
                subsidy_fen=event.subsidy_fen,
                policy_version=env.policy_version,
                status=domain.PENDING,
                expires_at=event.expires_at.ToDatetime(tzinfo=UTC),
                release_reason="",
                payment_ref="",
                serial=event.serial,
            )
        )
    elif isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased):
        # The status comes from the domain's evolve, never decided here.
        settled = domain.evolve(await load_reservation(conn, event.order_id), event)
        assert settled is not None
        details = (
            {"payment_ref": event.payment_ref}
            if isinstance(event, ev.SubsidyCaptured)
            else {"release_reason": event.reason}
        )
        await conn.execute(
            update(reservations)
            .where(reservations.c.order_id == event.order_id)
            .values(status=settled.status, **details)
        )


async def rebuild(store: EventStore) -> int:
    """Drop the ledger's read models and replay every event; returns how many were applied."""
    return await store.rebuild(
        (
            reservations,
            budget_pools,
            funding_keys,
            funding_proposals,
            pool_platforms,
            *reconciliation_tables.read_models,
        ),
        apply_event,
    )
