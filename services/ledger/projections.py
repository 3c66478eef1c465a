"""Ledger read models, fed by events: budget pools (and each funding source's money in them,
each category's use, the thresholds reached, the tranches scheduled), reservations, fundings.

Handlers apply each event here in the same transaction as its append (so decisions read current
state); :func:`rebuild` drops them and replays the store, which must give identical rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC
from functools import partial
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.kernel import background, metrics
from services.kernel.contract import budget
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import EventStore, streams_table
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain
from . import reconciliation_model as reconciliation
from . import settlement_model as settlement

log = logging.getLogger(__name__)
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
    Column("scheduled_fen", BigInteger, nullable=False, default=0),
    # How many shards hold the pool's available budget (PoolSharded; 1: this row alone), and
    # how many shard streams were ever made (a lowered count leaves the others' reservations).
    # With shards, this row and budget_sources are shard 0's figures; budget_shards the rest.
    Column("shards", Integer, nullable=False, default=1, server_default="1"),
    Column("shards_made", Integer, nullable=False, default=1, server_default="1"),
)

# Shards 1.. of a pool split into shards, one row each, so that a checkout on one shard writes
# one row no other shard's checkout waits for: the shard's figures, its sources'
# ([[source, funded, available, reserved, spent], ...] in the order they reached the shard) and
# its categories' use ({category: [reserved, spent]}).
budget_shards = Table(
    "budget_shards",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("funded_fen", BigInteger, nullable=False),
    Column("available_fen", BigInteger, nullable=False),
    Column("reserved_fen", BigInteger, nullable=False),
    Column("spent_fen", BigInteger, nullable=False),
    Column("sources", JSON, nullable=False, default=list),
    Column("categories", JSON, nullable=False, default=dict),
)

# Each funding source's money in a pool (the pool's row holds their sums): funded = available +
# reserved + spent per source. ``position`` is the order the source first funded the pool in
# (the priority rule's default order, and the fold's).
budget_sources = Table(
    "budget_sources",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("funded_fen", BigInteger, nullable=False),
    Column("available_fen", BigInteger, nullable=False),
    Column("reserved_fen", BigInteger, nullable=False),
    Column("spent_fen", BigInteger, nullable=False),
    Column("scheduled_fen", BigInteger, nullable=False),
)

# What each category holds and has spent of a pool (its sub-budget's use; the category's
# thresholds).
budget_categories = Table(
    "budget_categories",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("category", String(64), primary_key=True),
    Column("reserved_fen", BigInteger, nullable=False),
    Column("spent_fen", BigInteger, nullable=False),
)

# The thresholds reached (BudgetThresholdReached), once each: category "" is the whole pool.
budget_alerts = Table(
    "budget_alerts",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("category", String(64), primary_key=True),
    Column("threshold_bp", Integer, primary_key=True),
    Column("spent_fen", BigInteger, nullable=False),
    Column("base_fen", BigInteger, nullable=False),
    Column("order_id", String(64), nullable=False),
    Column("reached_at", DateTime(timezone=True), nullable=False),
)

# Every tranche of every scheduled funding, and whether it has been released yet.
budget_tranches = Table(
    "budget_tranches",
    metadata,
    Column("pool_id", String(64), primary_key=True),
    Column("funding_key", String(200), primary_key=True),
    Column("index", Integer, primary_key=True),
    Column("source", String(64), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("releases_at", DateTime(timezone=True), nullable=False),
    Column("released", Boolean, nullable=False),
    Index("budget_tranches_due", "released", "releases_at"),
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
    # What each funding source holds of subsidy_fen: [[source, fen], ...] in pool order.
    Column("sources", JSON, nullable=False, default=list),
    # What the platform declared paid at capture (NULL: not declared), and the capture's flag
    # (empty, PAID_AMOUNT_MISMATCH or PAID_AMOUNT_MISSING) under a policy that flags.
    Column("paid_amount_fen", BigInteger, nullable=True),
    Column("capture_flag", String(32), nullable=False, default=""),
    # The shard of its pool that holds it (0: the pool's own stream); its capture and release
    # act on that shard.
    Column("shard", Integer, nullable=False, default=0, server_default="0"),
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
    # The schedule: [[amount_fen, releases_at ISO 8601], ...]; empty: all at approval.
    Column("tranches", JSON, nullable=False, default=list),
    Column("shards", Integer, nullable=False, default=0, server_default="0"),
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
settlement_tables = settlement.SettlementTables(
    metadata, reservations, reconciliation_tables.captures
)


def refusal_stream(order_id: str) -> str:
    return f"refusal/{order_id}"


_P, _S, _K = budget_pools.c, budget_sources.c, budget_shards.c
# One round trip: the pool's figures and its sources' (a pool has a handful of sources).
_POOL_QUERY = (
    select(
        _P.funded_fen,
        _P.available_fen,
        _P.reserved_fen,
        _P.spent_fen,
        _P.scheduled_fen,
        _P.shards,
        _P.shards_made,
        _S.source,
        _S.funded_fen.label("s_funded"),
        _S.available_fen.label("s_available"),
        _S.reserved_fen.label("s_reserved"),
        _S.spent_fen.label("s_spent"),
        _S.scheduled_fen.label("s_scheduled"),
    )
    .select_from(budget_pools.outerjoin(budget_sources, _S.pool_id == _P.pool_id))
    .where(_P.pool_id == bindparam("pool_id"))
    .order_by(_S.position)
)
POOL = Statement(_POOL_QUERY, name="pool")
# Whether an order was refused (its refusal stream exists), a column of the hot path's reads.
_REFUSED = exists().where(streams_table.c.stream_id == bindparam("refusal")).label("refused")
# The reservations of a platform's order: itself when reserved whole, ``order_id/item`` per item
# (a LIKE on a prefix escaped with "/", an index range: the database's collation is C).
ORDER_LINES = (reservations.c.order_id == bindparam("order_id")) | reservations.c.order_id.like(
    bindparam("prefix"), escape="/"
)
_HAS_LINES = exists().where(ORDER_LINES).label("has_lines")
# The checkout's first read of a pool: its figures and sources (as POOL), whether the order was
# refused, the platforms the pool serves and whether the order has reservations already, in
# one round trip (no row: no such pool).
POOL_FOR_ORDER = Statement(
    _POOL_QUERY.add_columns(
        _HAS_LINES,
        _REFUSED,
        select(func.array_agg(pool_platforms.c.platform_id))
        .where(pool_platforms.c.pool_id == bindparam("pool_id"))
        .scalar_subquery()
        .label("platforms"),
    ),
    name="pool_for_order",
)
# The hold's read under the pool's lock: the pool (as POOL) and whether the order was refused.
# It also ends the order's attempt (deletes its reservation_attempts row, see handlers.reserve):
# in the hold's transaction, so that the row goes exactly when the hold commits (a refusal or
# a retry rolls the transaction back, the row with it), in the same round trip.
_ATTEMPT_ENDED = (
    delete(reservation_attempts)
    .where(reservation_attempts.c.order_id == bindparam("order_id"))
    .returning(reservation_attempts.c.order_id)
    .cte("attempt_ended")
)
POOL_FOR_HOLD = Statement(
    _POOL_QUERY.add_columns(_REFUSED).add_cte(_ATTEMPT_ENDED), name="pool_for_hold"
)
REFUSED = Statement(select(_REFUSED), name="refused")
PLATFORMS_REFUSED = Statement(
    select(
        _HAS_LINES,
        _REFUSED,
        select(func.array_agg(pool_platforms.c.platform_id))
        .where(pool_platforms.c.pool_id == bindparam("pool_id"))
        .scalar_subquery()
        .label("platforms"),
    ),
    name="platforms_refused",
)


@dataclass(frozen=True)
class Layout:
    """How a pool is split: its shard 0 (its own stream's figures: all of the pool's when it
    has one shard), the shard count, and how many shard streams were ever made."""

    main: budget.Pool
    shards: int = 1
    made: int = 1


async def load_layout(conn: AsyncConnection, pool_id: str) -> Layout | None:
    """The pool's own stream's figures (shard 0) and its shard counts."""
    return layout_of(pool_id, await POOL.all(conn, pool_id=pool_id))


def layout_of(pool_id: str, rows: Sequence[Any]) -> Layout | None:
    """The layout in the rows of POOL (or of a statement that adds columns to it)."""
    if not rows:
        return None
    first = rows[0]
    sources = tuple(
        budget.Source(r.source, r.s_funded, r.s_available, r.s_reserved, r.s_spent, r.s_scheduled)
        for r in rows
        if r.source is not None
    )
    main = budget.Pool(
        pool_id,
        first.funded_fen,
        first.available_fen,
        first.reserved_fen,
        first.spent_fen,
        first.scheduled_fen,
        sources,
    )
    return Layout(main, first.shards, first.shards_made)


def _shard_pool(pool_id: str, row: Any) -> budget.Pool:
    return budget.Pool(
        pool_id,
        row.funded_fen,
        row.available_fen,
        row.reserved_fen,
        row.spent_fen,
        sources=tuple(budget.Source(str(n), *map(int, f)) for n, *f in row.sources or ()),
    )


async def load_shards(
    conn: AsyncConnection, pool_id: str, layout: Layout | None = None
) -> tuple[Layout, dict[int, budget.Pool]]:
    """Every shard's figures (0: the pool's own stream), for a pool that exists (``layout``:
    as just read, in this transaction)."""
    layout = layout or await load_layout(conn, pool_id)
    if layout is None:
        raise LookupError(pool_id)
    figures = {0: layout.main}
    if layout.made > 1:
        rows = await SHARDS.all(conn, pool_id=pool_id)
        figures.update({r.shard: _shard_pool(pool_id, r) for r in rows})
    return layout, figures


SHARDS = Statement(
    select(budget_shards).where(_K.pool_id == bindparam("pool_id")).order_by(_K.shard),
    name="shards",
)


async def load_pool(conn: AsyncConnection, pool_id: str) -> budget.Pool | None:
    """A pool's figures and its sources', as the fold left them (summed over its shards)."""
    layout = await load_layout(conn, pool_id)
    if layout is None or layout.made <= 1:
        return layout.main if layout is not None else None
    _, figures = await load_shards(conn, pool_id, layout)
    return budget.total(pool_id, (figures[k] for k in sorted(figures)))


# One statement, so one snapshot: the whole pool's available budget at one moment.
_AVAILABLE_QUERY = select(
    _P.available_fen
    + func.coalesce(
        select(func.sum(_K.available_fen)).where(_K.pool_id == _P.pool_id).scalar_subquery(), 0
    )
).where(_P.pool_id == bindparam("pool_id"))


async def load_available(conn: AsyncConnection, pool_id: str) -> int:
    """What the pool has available over all its shards, as one snapshot of what committed."""
    return int(await AVAILABLE.scalar(conn, pool_id=pool_id) or 0)


AVAILABLE = Statement(_AVAILABLE_QUERY, name="available")


_SHARD_QUERY = (
    select(
        _P.shards,
        _P.shards_made,
        _K.funded_fen,
        _K.available_fen,
        _K.reserved_fen,
        _K.spent_fen,
        _K.sources,
    )
    .select_from(
        budget_pools.outerjoin(
            budget_shards, (_K.pool_id == _P.pool_id) & (_K.shard == bindparam("shard"))
        )
    )
    .where(_P.pool_id == bindparam("pool_id"))
)
SHARD = Statement(_SHARD_QUERY, name="shard")
SHARD_FOR_HOLD = Statement(  # as POOL_FOR_HOLD, for shards 1..
    _SHARD_QUERY.add_columns(_REFUSED).add_cte(_ATTEMPT_ENDED), name="shard_for_hold"
)
_NO_REFUSAL = "\x00"  # no stream has this id: the shard's read asks about no refusal


async def load_shard(
    conn: AsyncConnection, pool_id: str, shard: int
) -> tuple[budget.Pool | None, int, int]:
    """One shard's figures (None: no pool; a shard given nothing yet holds nothing), the
    pool's shard count and how many shard streams it ever had, in one round trip."""
    if shard == 0:
        layout = await load_layout(conn, pool_id)
        return (layout.main, layout.shards, layout.made) if layout is not None else (None, 1, 1)
    return shard_of_row(pool_id, await SHARD.first(conn, pool_id=pool_id, shard=shard))


def shard_of_row(pool_id: str, row: Any) -> tuple[budget.Pool | None, int, int]:
    """:func:`load_shard`'s answer from a row of SHARD (or of a statement adding to it)."""
    if row is None:
        return None, 1, 1
    if row.funded_fen is None:
        return budget.Pool(pool_id), row.shards, row.shards_made
    return _shard_pool(pool_id, row), row.shards, row.shards_made


async def load_use(
    conn: AsyncConnection, pool_id: str, category: str, sharded: bool = False
) -> domain.CategoryUse:
    """What ``category`` holds and has spent of the pool (``sharded``: of all its shards)."""
    row = await USE.first(conn, pool_id=pool_id, category=category)
    use = domain.CategoryUse(category, *row) if row is not None else domain.CategoryUse(category)
    return await shards_use(conn, use, pool_id) if sharded else use


async def shards_use(
    conn: AsyncConnection, use: domain.CategoryUse, pool_id: str
) -> domain.CategoryUse:
    """``use`` (shard 0's) with what shards 1.. of the pool hold and spent of its category."""
    for (held,) in await SHARD_CATEGORIES.all(conn, pool_id=pool_id):
        reserved, spent = (held or {}).get(use.category, (0, 0))
        use = domain.CategoryUse(use.category, use.reserved + reserved, use.spent + spent)
    return use


_C = budget_categories.c
USE = Statement(
    select(_C.reserved_fen, _C.spent_fen).where(
        _C.pool_id == bindparam("pool_id"), _C.category == bindparam("category")
    ),
    name="use",
)
SHARD_CATEGORIES = Statement(
    select(_K.categories).where(_K.pool_id == bindparam("pool_id")), name="shard_categories"
)


async def load_shard_categories(conn: AsyncConnection, pool_id: str) -> dict[str, tuple[int, int]]:
    """Each category's (reserved, spent) in the pool's shards 1.. (shard 0's: budget_categories)."""
    out: dict[str, tuple[int, int]] = {}
    for (held,) in await SHARD_CATEGORIES.all(conn, pool_id=pool_id):
        for category, (reserved, spent) in (held or {}).items():
            r, sp = out.get(category, (0, 0))
            out[category] = (r + reserved, sp + spent)
    return out


async def load_alerted(
    conn: AsyncConnection, pool_id: str, category: str
) -> frozenset[tuple[str, int]]:
    """The thresholds already reached for the pool and for ``category``."""
    rows = await ALERTED.all(conn, pool_id=pool_id, category=category)
    return frozenset((c, t) for c, t in rows)


_A = budget_alerts.c
_ALERTED = or_(_A.category == "", _A.category == bindparam("category"))
ALERTED = Statement(
    select(_A.category, _A.threshold_bp).where(_A.pool_id == bindparam("pool_id"), _ALERTED),
    name="alerted",
)


async def load_pending_tranches(
    conn: AsyncConnection, pool_id: str
) -> list[domain.ScheduledTranche]:
    """The pool's tranches not released yet, in time order."""
    t = budget_tranches.c
    rows = await conn.execute(
        select(t.pool_id, t.funding_key, t.index, t.source, t.amount_fen, t.releases_at)
        .where(t.pool_id == pool_id, t.released.is_(False))
        .order_by(t.releases_at, t.funding_key, t.index)
    )
    return [domain.ScheduledTranche(*r) for r in rows]


def _parts(stored: Any) -> budget.Parts:
    return tuple((str(source), int(fen)) for source, fen in stored or ())


def _tranches(stored: Any) -> tuple[domain.Tranche, ...]:
    return tuple(
        domain.Tranche(int(fen), dt.datetime.fromisoformat(str(at))) for fen, at in stored or ()
    )


_R = reservations.c
_RESERVATION_QUERY = select(
    _R.order_id,
    _R.pool_id,
    _R.subsidy_fen,
    _R.status,
    _R.qualification_id,
    _R.sources,
    _R.category,
    _R.unit_price_fen,
).where(_R.order_id == bindparam("order_id"))
RESERVATION = Statement(_RESERVATION_QUERY, name="reservation")
# A capture's read under the pool's lock: the reservation (as RESERVATION), its platform (for
# the bill's capture row), its category's use of the pool (shard 0's), the thresholds already
# reached for the pool and that category, and the pool's shard 0 and sources (as POOL, one row
# per source), in one round trip.
SETTLE_WATCHED = Statement(
    _RESERVATION_QUERY.add_columns(
        *(c for c in _POOL_QUERY.selected_columns),
        _R.platform_id,
        select(_C.reserved_fen)
        .where(_C.pool_id == _R.pool_id, _C.category == bindparam("category"))
        .scalar_subquery()
        .label("use_reserved"),
        select(_C.spent_fen)
        .where(_C.pool_id == _R.pool_id, _C.category == bindparam("category"))
        .scalar_subquery()
        .label("use_spent"),
        select(func.array_agg(aggregate_order_by(_A.category, _A.category, _A.threshold_bp)))
        .where(_A.pool_id == _R.pool_id, _ALERTED)
        .scalar_subquery()
        .label("alert_categories"),
        select(func.array_agg(aggregate_order_by(_A.threshold_bp, _A.category, _A.threshold_bp)))
        .where(_A.pool_id == _R.pool_id, _ALERTED)
        .scalar_subquery()
        .label("alert_thresholds"),
    )
    .select_from(
        reservations.outerjoin(budget_pools, _P.pool_id == _R.pool_id).outerjoin(
            budget_sources, _S.pool_id == _P.pool_id
        )
    )
    .order_by(_S.position),
    name="settle_watched",
)
SETTLE_PLAIN = Statement(_RESERVATION_QUERY.add_columns(_R.platform_id), name="settle_plain")


async def load_reservation(conn: AsyncConnection, order_id: str) -> domain.Reservation | None:
    return reservation_of(await RESERVATION.first(conn, order_id=order_id))


def reservation_of(row: Any) -> domain.Reservation | None:
    """The reservation in a row of RESERVATION (or of a statement adding to it)."""
    if row is None:
        return None
    return domain.Reservation(
        row.order_id,
        row.pool_id,
        row.subsidy_fen,
        row.status,
        row.qualification_id,
        sources=_parts(row.sources),
        category=row.category,
        unit_price_fen=row.unit_price_fen,
    )


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
    values["tranches"] = _tranches(values["tranches"])
    return domain.FundingProposal(**values)


async def load_pool_platforms(conn: AsyncConnection, pool_id: str) -> frozenset[str]:
    rows = await conn.execute(
        select(pool_platforms.c.platform_id).where(pool_platforms.c.pool_id == pool_id)
    )
    return frozenset(rows.scalars())


@dataclass
class Seen:
    """What a checkout command read under its stream's lock, handed to the projection of the
    events it appends in the same transaction, so that nothing is read twice: the pool's
    layout (shard 0's row, read under its lock), the reservation settled and its platform.
    Each is used once, by the first event about it (after which the row has moved); the
    projection leaves the reservation's row as written in ``row`` (the command's answer)."""

    layout: Layout | None = None
    reservation: domain.Reservation | None = None
    platform_id: str | None = None
    row: dict[str, object] | None = field(default=None, repr=False)

    def take_layout(self, pool_id: str) -> Layout | None:
        layout, self.layout = self.layout, None
        return layout if layout is not None and layout.main.pool_id == pool_id else None

    def take_reservation(self, order_id: str) -> domain.Reservation | None:
        res, self.reservation = self.reservation, None
        return res if res is not None and res.order_id == order_id else None

    def take_platform(self, order_id: str, settled: domain.Reservation | None) -> str | None:
        platform, self.platform_id = self.platform_id, None
        return platform if settled is not None and settled.order_id == order_id else None


async def apply_event(conn: AsyncConnection, env: Envelope, seen: Seen | None = None) -> None:
    """Apply one ledger event to the read models (``seen``: what the command appending it
    read under its lock, so as not to read it again)."""
    event = payload_of(env)
    settled = None
    bill: dict[str, object] | None = None
    if isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased):
        if seen is not None:
            settled = seen.take_reservation(event.order_id)
        platform = seen.take_platform(event.order_id, settled) if seen is not None else None
        if settled is None:
            settled = await load_reservation(conn, event.order_id)
        main = not budget.stream_shard(env.stream_id)[1]  # shard 0's stream: written below
        if isinstance(event, ev.SubsidyCaptured) and event.pool_id and main:
            # Its bill row is written with the reservation row, below (_reservation_row).
            bill = await reconciliation.capture_row(
                conn, reconciliation_tables, env, event, platform
            )
        else:
            await reconciliation.apply_event(conn, reconciliation_tables, env, event, platform)
    else:
        await reconciliation.apply_event(conn, reconciliation_tables, env, event)
    if await settlement.apply_event(conn, settlement_tables, env, event):
        return
    if isinstance(event, ev.FundingProposed | ev.FundingApproved):
        known = await load_proposal(conn, event.proposal_id)
        proposal = domain.evolve_proposal(known, event, env.actor.id)
        assert proposal is not None
        values = asdict(proposal)
        values["platform_ids"] = ",".join(proposal.platform_ids)
        values["tranches"] = [[t.amount_fen, t.releases_at.isoformat()] for t in proposal.tranches]
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
    if isinstance(event, ev.BudgetThresholdReached):
        await conn.execute(
            insert(budget_alerts).values(
                pool_id=event.pool_id,
                category=event.category,
                threshold_bp=event.threshold_bp,
                spent_fen=event.spent_fen,
                base_fen=event.base_fen,
                order_id=event.order_id,
                reached_at=env.occurred_at.ToDatetime(tzinfo=UTC),
            )
        )
        metrics.BUDGET_THRESHOLD.labels(event.pool_id, event.category, str(event.threshold_bp)).set(
            1
        )
        return
    pool_id = getattr(event, "pool_id", "")
    if not pool_id:
        return
    if isinstance(event, ev.PoolSharded):
        await conn.execute(
            update(budget_pools)
            .where(_P.pool_id == pool_id)
            .values(shards=event.shards, shards_made=func.greatest(_P.shards_made, event.shards))
        )
        return
    _, shard = budget.stream_shard(env.stream_id)
    if shard:  # one of shards 1..: its own row, nothing else of the pool's
        await _apply_shard(conn, env, event, pool_id, shard, settled, seen)
        return
    layout = seen.take_layout(pool_id) if seen is not None else None
    layout = layout or await load_layout(conn, pool_id)
    before = layout.main if layout is not None else None
    # An event written before sources is attributed as its reservation was (stored with it).
    held = settled.sources if settled is not None else None
    after, parts = budget.step(before or budget.Pool(pool_id), event, held)
    sharded = layout is not None and layout.made > 1
    # A checkout's event writes its pool's move with its reservation row, in one statement.
    checkout = isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased)
    move = await _write_pool(conn, before, after, gauges=not sharded, hand_back=checkout)
    if sharded:
        SHARDED_GAUGES.mark(pool_id)
    if isinstance(event, ev.SubsidyReserved):
        metrics.RESERVATIONS.labels("reserved").inc()
    elif isinstance(event, ev.SubsidyCaptured):
        metrics.RESERVATIONS.labels("captured").inc()
    elif isinstance(event, ev.SubsidyReleased):
        metrics.RESERVATIONS.labels(f"released_{event.reason.lower()}").inc()
    if isinstance(event, ev.BudgetFunded):
        if event.idempotency_key:
            await conn.execute(
                insert(funding_keys).values(
                    idempotency_key=event.idempotency_key,
                    pool_id=pool_id,
                    amount_fen=event.amount_fen,
                )
            )
        if event.tranches:
            await conn.execute(
                insert(budget_tranches),
                [
                    {
                        "pool_id": t.pool_id,
                        "funding_key": t.funding_key,
                        "index": t.index,
                        "source": t.source,
                        "amount_fen": t.amount_fen,
                        "releases_at": t.releases_at,
                        "released": False,
                    }
                    for t in domain.scheduled(event)
                ],
            )
    elif isinstance(event, ev.TrancheReleased):
        t = budget_tranches.c
        await conn.execute(
            update(budget_tranches)
            .where(t.pool_id == pool_id, t.funding_key == event.funding_key, t.index == event.index)
            .values(released=True)
        )
    elif isinstance(event, ev.SubsidyReserved):
        use = (pool_id, event.category)
        await _reservation_row(conn, env, event, parts, None, 0, seen, use, move)
    elif isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased):
        assert settled is not None
        use = (pool_id, event.category or settled.category)
        await _reservation_row(conn, env, event, parts, settled, 0, seen, use, move, bill)


async def _reservation_row(
    conn: AsyncConnection,
    env: Envelope,
    event: Message,
    parts: budget.Parts,
    settled: domain.Reservation | None,
    shard: int,
    seen: Seen | None = None,
    use: tuple[str, str] | None = None,
    move: dict[str, object] | None = None,
    bill: dict[str, object] | None = None,
) -> None:
    """The reservation's row after its event (held by ``shard`` of its pool); ``seen``
    keeps the row as written. With ``use`` (a pool and category), the pool's use of that
    category moves as the event moves it, in the same statement (the upsert as its CTE); with
    ``move`` too (_write_pool's hand-back), so do the pool's row and its source's; and a
    capture's ``bill`` row (reconciliation.capture_row) with them, else on its own first."""
    moved = {} if use is None else _use_delta(*use, event)
    statements = _ROW_STATEMENTS if use is None else _ROW_AND_USE_STATEMENTS
    if move is not None:
        assert use is not None
        moved |= move
        statements = _ROW_USE_AND_POOL_STATEMENTS
    if bill is not None and move is not None:
        moved |= {f"bill_{k}": v for k, v in bill.items()}
        statements = (*statements[:1], _CAPTURED_USE_POOL_AND_BILL, *statements[2:])
    elif bill is not None:
        await reconciliation_tables.capture_insert.run(conn, **bill)
    written = None
    if isinstance(event, ev.SubsidyReserved):
        written = await statements[0].first(
            conn,
            **moved,
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
            serial=event.serial,
            sources=_json([list(p) for p in parts]),
            shard=shard,
        )
    elif isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased):
        # The status comes from the domain's evolve, never decided here.
        assert settled is not None
        status = domain.evolve(settled, event)
        assert status is not None
        if isinstance(event, ev.SubsidyCaptured):
            written = await statements[1].first(
                conn,
                **moved,
                order_id=event.order_id,
                status=status.status,
                payment_ref=event.payment_ref,
                paid_amount_fen=(
                    event.paid_amount_fen if event.HasField("paid_amount_fen") else None
                ),
                capture_flag=event.flag,
            )
        else:
            written = await statements[2].first(
                conn,
                **moved,
                order_id=event.order_id,
                status=status.status,
                release_reason=event.reason,
            )
    if use is not None:
        assert written is not None  # the reservation's row is there (its event came first)
        _use_gauges(*use, written.use_reserved, written.use_spent)
    if seen is not None and written is not None:
        seen.row = {c: getattr(written, c) for c in _RESERVATION_COLUMNS}


def _json(value: object) -> str:
    # As SQLAlchemy's JSON type writes a value (json.dumps, psycopg's default serialiser).
    return json.dumps(value)


def _json_param(name: str) -> Any:
    """A JSON column's value as text (a Statement binds no type that needs a processor)."""
    return cast(bindparam(name, type_=Text), JSON)


_RESERVATION_INSERT = (
    insert(reservations)
    .values(
        {
            **{
                c: bindparam(c)
                for c in (
                    "order_id",
                    "pool_id",
                    "platform_id",
                    "consumer_id",
                    "qualification_id",
                    "sku",
                    "merchant_id",
                    "category",
                    "unit_price_fen",
                    "subsidy_fen",
                    "policy_version",
                    "status",
                    "expires_at",
                    "serial",
                    "shard",
                )
            },
            # Every column's value written here: a Python-side column default would be bound
            # as None by a statement compiled once (SQLAlchemy fills it in per execution).
            "release_reason": "",
            "payment_ref": "",
            "capture_flag": "",
            "sources": _json_param("sources"),
        }
    )
    .returning(*reservations.c)
)
RESERVATION_INSERT = Statement(_RESERVATION_INSERT, name="reservation_insert")
_RESERVATION_CAPTURED = (
    update(reservations)
    .where(_R.order_id == bindparam("order_id"))
    .values(
        status=bindparam("status"),
        payment_ref=bindparam("payment_ref"),
        paid_amount_fen=bindparam("paid_amount_fen"),
        capture_flag=bindparam("capture_flag"),
    )
    .returning(*reservations.c)
)
RESERVATION_CAPTURED = Statement(_RESERVATION_CAPTURED, name="reservation_captured")
_RESERVATION_RELEASED = (
    update(reservations)
    .where(_R.order_id == bindparam("order_id"))
    .values(status=bindparam("status"), release_reason=bindparam("release_reason"))
    .returning(*reservations.c)
)
RESERVATION_RELEASED = Statement(_RESERVATION_RELEASED, name="reservation_released")


class ShardedGauges:
    """The budget gauges of pools split into shards (the sums over their shards), set off the
    checkout path. A pool of one shard sets its gauges from the figures its event just folded
    (:func:`_write_pool`); a sharded pool's event has only its own shard's, and summing them
    under the lock cost every reserve and capture two more statements. So an event marks its
    pool and :meth:`run` sets the gauges from what has committed, once a round.

    A mark is made before its transaction commits, so a pool is read again for
    :data:`KEEP_ROUNDS` rounds after its last mark: the gauges then show every commit that
    ended within that many seconds of its projection."""

    ROUND_S = 1.0
    KEEP_ROUNDS = 5

    def __init__(self) -> None:
        self._due: dict[str, int] = {}  # pool -> rounds it is still read

    def mark(self, pool_id: str) -> None:
        self._due[pool_id] = self.KEEP_ROUNDS

    def due(self) -> list[str]:
        return sorted(self._due)

    async def refresh(self, engine: AsyncEngine) -> None:
        """One round: every pool marked within the last rounds, from one read each."""
        pools = self.due()
        if not pools:
            return
        async with engine.connect() as conn:
            for pool_id in pools:
                pool = await load_pool(conn, pool_id)
                if pool is not None:
                    _set_gauges(pool)
        for pool_id in pools:  # counted down only once read (a failed round is read again)
            left = self._due.get(pool_id, 0) - 1
            if left > 0:
                self._due[pool_id] = left
            elif left == 0:
                del self._due[pool_id]

    async def run(self, engine: AsyncEngine, stop: asyncio.Event) -> None:
        await background.every(
            stop,
            self.ROUND_S,
            partial(self.refresh, engine),
            log=log,
            failure="the budget gauges of sharded pools were not refreshed",
            alert="budget-gauges",
        )


SHARDED_GAUGES = ShardedGauges()  # one per process, as the gauges it sets


def _set_gauges(pool: budget.Pool) -> None:
    for bucket in budget.BUCKETS:
        metrics.BUDGET.labels(pool.pool_id, bucket).set(getattr(pool, bucket))
    for s in pool.sources:
        for bucket in budget.BUCKETS:
            metrics.BUDGET_SOURCE.labels(pool.pool_id, s.source, bucket).set(getattr(s, bucket))


async def _apply_shard(
    conn: AsyncConnection,
    env: Envelope,
    event: Message,
    pool_id: str,
    shard: int,
    settled: domain.Reservation | None,
    seen: Seen | None,
) -> None:
    """An event of shard ``shard`` >= 1 of a pool: the shard's row (figures, sources and its
    categories' use) through the same budget fold, and the reservation's row (``settled``:
    the reservation a capture or release settles, as read under the lock)."""
    row = await SHARD_ROW.first(conn, pool_id=pool_id, shard=shard)
    before = _shard_pool(pool_id, row) if row is not None else budget.Pool(pool_id)
    categories: dict[str, list[int]] = dict(row.categories or {}) if row is not None else {}
    after, parts = budget.step(before, event, settled.sources if settled is not None else None)
    if isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased):
        category = event.category or (settled.category if settled is not None else "")
        reserved, spent = categories.get(category, (0, 0))
        use = domain.evolve_use(domain.CategoryUse(category, reserved, spent), event)
        categories[category] = [use.reserved, use.spent]
    values = {
        "funded_fen": after.funded,
        "available_fen": after.available,
        "reserved_fen": after.reserved,
        "spent_fen": after.spent,
        "sources": _json(
            [[s.source, s.funded, s.available, s.reserved, s.spent] for s in after.sources]
        ),
        "categories": _json(categories),
    }
    await (SHARD_INSERT if row is None else SHARD_UPDATE).run(
        conn, pool_id=pool_id, shard=shard, **values
    )
    SHARDED_GAUGES.mark(pool_id)
    if isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased):
        await _reservation_row(conn, env, event, parts, settled, shard, seen)


SHARD_ROW = Statement(
    select(budget_shards).where(_K.pool_id == bindparam("pool_id"), _K.shard == bindparam("shard")),
    name="shard_row",
)
_SHARD_VALUES = {
    **{f"{b}_fen": bindparam(f"{b}_fen") for b in ("funded", "available", "reserved", "spent")},
    "sources": _json_param("sources"),
    "categories": _json_param("categories"),
}
SHARD_INSERT = Statement(
    insert(budget_shards).values(
        pool_id=bindparam("pool_id"), shard=bindparam("shard"), **_SHARD_VALUES
    ),
    name="shard_insert",
)
SHARD_UPDATE = Statement(
    update(budget_shards)
    .where(_K.pool_id == bindparam("pool_id"), _K.shard == bindparam("shard"))
    .values(**_SHARD_VALUES),
    name="shard_update",
)


async def _write_pool(
    conn: AsyncConnection,
    before: budget.Pool | None,
    after: budget.Pool,
    gauges: bool = True,
    *,
    hand_back: bool = False,
) -> dict[str, object] | None:
    """Write the fold's figures for the pool and for each source that changed. With
    ``hand_back``, a checkout's move (the pool and one source) is not run but returned, as the
    parameters of the reservation row's statement that makes it (_ROW_USE_AND_POOL_STATEMENTS:
    one statement, one round trip, instead of two)."""
    values = {f"{b}_fen": getattr(after, b) for b in budget.BUCKETS}
    for bucket in budget.BUCKETS if gauges else ():
        metrics.BUDGET.labels(after.pool_id, bucket).set(getattr(after, bucket))
    known = {s.source: s for s in (before.sources if before is not None else ())}
    added, changed = [], []
    for position, s in enumerate(after.sources):
        if known.get(s.source) == s:
            continue
        row = {f"{b}_fen": getattr(s, b) for b in budget.BUCKETS}
        for bucket in budget.BUCKETS if gauges else ():
            metrics.BUDGET_SOURCE.labels(after.pool_id, s.source, bucket).set(getattr(s, bucket))
        if s.source in known:
            changed.append({"p": after.pool_id, "s": s.source, **row})
        else:
            added.append(
                {"pool_id": after.pool_id, "source": s.source, "position": position, **row}
            )
    if before is None:
        await conn.execute(insert(budget_pools).values(pool_id=after.pool_id, **values))
    elif before != after:
        if len(changed) == 1 and not added:  # a checkout's move: the pool and one source
            pool = {f"pool_{k}": v for k, v in values.items()}
            if hand_back:
                return {f"move_{k}": v for k, v in {"pool_id": after.pool_id, **pool}.items()} | {
                    f"move_{k}": v for k, v in changed[0].items()
                }
            await POOL_AND_SOURCE_UPDATE.run(conn, pool_id=after.pool_id, **pool, **changed[0])
            return None
        await POOL_UPDATE.run(conn, pool_id=after.pool_id, **values)
    if added:
        await conn.execute(insert(budget_sources), added)
    await SOURCE_UPDATE.run_many(conn, changed)
    return None


_SOURCE_UPDATE = (
    update(budget_sources)
    .where(_S.pool_id == bindparam("p"), _S.source == bindparam("s"))
    .values({f"{b}_fen": bindparam(f"{b}_fen") for b in budget.BUCKETS})
)
SOURCE_UPDATE = Statement(_SOURCE_UPDATE, name="source_update")
_POOL_UPDATE = (
    update(budget_pools)
    .where(_P.pool_id == bindparam("pool_id"))
    .values({f"{b}_fen": bindparam(f"{b}_fen") for b in budget.BUCKETS})
)
POOL_UPDATE = Statement(_POOL_UPDATE, name="pool_update")
# The pool's row and one source's in one statement (a data-modifying CTE: both rows are
# written whatever the other finds; each is keyed by its primary key, as the two updates are).
POOL_AND_SOURCE_UPDATE = Statement(
    _SOURCE_UPDATE.add_cte(
        update(budget_pools)
        .where(_P.pool_id == bindparam("pool_id"))
        .values({f"{b}_fen": bindparam(f"pool_{b}_fen") for b in budget.BUCKETS})
        .returning(_P.pool_id)
        .cte("pool_moved")
    ),
    name="pool_and_source_update",
)


def _use_delta(pool_id: str, category: str, event: Any) -> dict[str, object]:
    """USE_MOVE's parameters: the change the order's event makes to the category's figures."""
    delta = domain.evolve_use(domain.CategoryUse(category), event)  # from zero: the change
    return {
        "use_pool": pool_id,
        "use_category": category,
        "reserved": delta.reserved,
        "spent": delta.spent,
    }


def _use_gauges(pool_id: str, category: str, reserved: int, spent: int) -> None:
    metrics.BUDGET_CATEGORY.labels(pool_id, category, "reserved").set(reserved)
    metrics.BUDGET_CATEGORY.labels(pool_id, category, "spent").set(spent)


# Move the category's figures as the order's event moves them (an upsert: the first order of a
# category makes its row).
_USE_INSERT = pg_insert(budget_categories).values(
    pool_id=bindparam("use_pool"),
    category=bindparam("use_category"),
    reserved_fen=bindparam("reserved"),
    spent_fen=bindparam("spent"),
)
_USE_MOVED = (
    _USE_INSERT.on_conflict_do_update(
        index_elements=[_C.pool_id, _C.category],
        set_={
            "reserved_fen": _C.reserved_fen + _USE_INSERT.excluded.reserved_fen,
            "spent_fen": _C.spent_fen + _USE_INSERT.excluded.spent_fen,
        },
    )
    .returning(_C.reserved_fen, _C.spent_fen)
    .cte("use_moved")
)
_RESERVATION_COLUMNS = tuple(c.name for c in reservations.c)
_ROW_STATEMENTS = (RESERVATION_INSERT, RESERVATION_CAPTURED, RESERVATION_RELEASED)
# The same, each with the category's move as its CTE and the figures it left returned with the
# row (data-modifying CTEs run whatever the main statement finds; the two rows are distinct).
_ROW_AND_USE_STATEMENTS = tuple(
    Statement(
        stmt.add_cte(_USE_MOVED).returning(
            select(_USE_MOVED.c.reserved_fen).scalar_subquery().label("use_reserved"),
            select(_USE_MOVED.c.spent_fen).scalar_subquery().label("use_spent"),
        ),
        name=f"{name}_and_use",
    )
    for stmt, name in (
        (_RESERVATION_INSERT, "reservation_insert"),
        (_RESERVATION_CAPTURED, "reservation_captured"),
        (_RESERVATION_RELEASED, "reservation_released"),
    )
)


# The same again, the pool's row and one source's moved too (POOL_AND_SOURCE_UPDATE's two
# updates as CTEs, their parameters prefixed ``move_``): a checkout's whole projection in one
# statement. Each row is keyed by its primary key, and every CTE runs whatever the others find.
_MOVE_POOL = (
    update(budget_pools)
    .where(_P.pool_id == bindparam("move_pool_id"))
    .values({f"{b}_fen": bindparam(f"move_pool_{b}_fen") for b in budget.BUCKETS})
    .returning(_P.pool_id)
    .cte("move_pool")
)
_MOVE_SOURCE = (
    update(budget_sources)
    .where(_S.pool_id == bindparam("move_p"), _S.source == bindparam("move_s"))
    .values({f"{b}_fen": bindparam(f"move_{b}_fen") for b in budget.BUCKETS})
    .returning(_S.source)
    .cte("move_source")
)
_ROW_USE_AND_POOL_STATEMENTS = tuple(
    Statement(
        stmt.add_cte(_USE_MOVED, _MOVE_POOL, _MOVE_SOURCE).returning(
            select(_USE_MOVED.c.reserved_fen).scalar_subquery().label("use_reserved"),
            select(_USE_MOVED.c.spent_fen).scalar_subquery().label("use_spent"),
        ),
        name=f"{name}_use_and_pool",
    )
    for stmt, name in (
        (_RESERVATION_INSERT, "reservation_insert"),
        (_RESERVATION_CAPTURED, "reservation_captured"),
        (_RESERVATION_RELEASED, "reservation_released"),
    )
)


# A capture's, its bill row too (reconciliation's capture_insert as a CTE, its parameters
# prefixed ``bill_``): the whole capture's projection in one statement.
_BILL = reconciliation_tables.captures
_CAPTURED_USE_POOL_AND_BILL = Statement(
    _RESERVATION_CAPTURED.add_cte(
        _USE_MOVED,
        _MOVE_POOL,
        _MOVE_SOURCE,
        insert(_BILL)
        .values({c.name: bindparam(f"bill_{c.name}") for c in _BILL.c})
        .returning(_BILL.c.order_id)
        .cte("bill_capture"),
    ).returning(
        select(_USE_MOVED.c.reserved_fen).scalar_subquery().label("use_reserved"),
        select(_USE_MOVED.c.spent_fen).scalar_subquery().label("use_spent"),
    ),
    name="reservation_captured_use_pool_and_bill",
)


async def rebuild(store: EventStore) -> int:
    """Drop the ledger's read models and replay every event; returns how many were applied."""
    return await store.rebuild(
        (
            reservations,
            budget_pools,
            budget_sources,
            budget_shards,
            budget_categories,
            budget_alerts,
            budget_tranches,
            funding_keys,
            funding_proposals,
            pool_platforms,
            *reconciliation_tables.read_models,
            *settlement_tables.read_models,
        ),
        apply_event,
    )
