"""Ledger use cases: budget pools and the checkout's reserve, capture and release.

Each use case builds a command from already-validated input (``api.py`` validates at the
edge) and runs it through the kernel's pipeline with a decision from ``domain.py``. The reserve
saga spans three services and so has steps of its own: the item is verified with catalog, the
attempt is recorded, the qualification is locked with eligibility, then the hold is decided
under the pool's lock; an order is held or refused, never both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

import grpc
from google.protobuf.message import Message
from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.kernel import vault
from services.kernel.background import every
from services.kernel.contract import budget, order_line
from services.kernel.contract.budget import pool_stream, shard_stream
from services.kernel.contract.policy import FundingRules
from services.kernel.contract.risk import Action, Kind, Outcome, Subjects
from services.kernel.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted
from services.kernel.events import Context, payload_of, service_actor
from services.kernel.eventstore import EventStore, Tx, streams_table
from services.kernel.pipeline import Aggregate, Pipeline
from services.kernel.riskscreen import Circumstances, RiskBlocked, Screening
from services.kernel.rpc import as_domain_error
from services.kernel.sql import Statement
from subsidy.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    eligibility_pb2,
    eligibility_pb2_grpc,
)
from subsidy.v1 import events_pb2 as ev

from . import domain
from .funding import FundingUseCases, append_plan, lock_shards
from .policies import FundingPolicies
from .projections import (
    ORDER_LINES,
    PLATFORMS_REFUSED,
    POOL_FOR_HOLD,
    POOL_FOR_ORDER,
    REFUSED,
    SERIAL_CONSTRAINT,
    SETTLE_PLAIN,
    SETTLE_WATCHED,
    SHARD_FOR_HOLD,
    Seen,
    apply_event,
    budget_alerts,
    budget_categories,
    budget_pools,
    budget_tranches,
    layout_of,
    load_available,
    load_layout,
    load_pending_tranches,
    load_pool,
    load_pool_platforms,
    load_shard,
    load_shard_categories,
    load_shards,
    load_use,
    refusal_stream,
    reservation_of,
    shard_of_row,
    shards_use,
)
from .projections import reservation_attempts as attempts_t
from .projections import reservations as reservations_t
from .reconciliation import Reconciliations
from .risk import LedgerRisk
from .settlement import SettlementUseCases

SERVICE = "ledger"
# Answers after which eligibility certainly locked nothing.
DEFINITIVE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
}
log = logging.getLogger(__name__)
# The circumstances whose blind indexes a reservation's event keeps (the risk subjects that are
# blind-indexed; the person, merchant and serial are on the event as they are).
CIRCUMSTANCES = frozenset({Kind.DEVICE, Kind.IP, Kind.ADDRESS, Kind.CARD})


@dataclass(frozen=True)
class OrderKey:
    pool_id: str
    order_id: str
    # The item's category, when its use of the pool is part of the decision (a sub-budget
    # caps it, or its thresholds are watched); empty: not loaded.
    category: str = ""
    # A capture under thresholds: load the pool's figures and the alerts raised too.
    watch: bool = False
    # The shard of the pool that holds (or is to hold) the order: its stream is locked.
    shard: int = 0


# Budgets a shard is short of that its siblings may have: the hold is tried again with every
# shard locked, after a rebalance (a refusal then is the whole pool's).
SHORT = frozenset({"BUDGET_EXHAUSTED", "SOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class Route:
    """Where a hold is tried: the shard (by the shard count it was routed with), and whether
    with every shard locked after a rebalance (``gather``)."""

    shard: int = 0
    shards: int = 1
    gather: bool = False


class HoldAgain(Exception):  # a signal to try again, not an error anyone sees
    """The hold is to be tried again by ``route`` (its transaction rolled back, nothing
    written): the shard was short, or the shard count changed since the order was routed."""

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.route = route


def route_of(key: str, capped: str, shards: int) -> int:
    """The shard that holds a reservation: by its key's hash, except an item whose category
    has a sub-budget, held by shard 0 (its sub-budget is then decided under one lock)."""
    return 0 if capped else domain.shard_of(key, shards)


def decide_hold(
    state: domain.Hold,
    route: Route,
    capped: str,
    key: str,
    need: int,
    hold: Callable[[domain.Hold], list[Message]],
) -> list[Message]:
    """The hold on the routed shard, or :class:`HoldAgain`: routed by a count that changed,
    or short on a shard whose siblings may pay (a pool of one shard refuses as before). When
    the whole pool, read as one snapshot, cannot pay either, the refusal stands as it is: the
    order is refused at that snapshot, as a pool of one shard refuses under its lock."""
    if not route.gather and route_of(key, capped, state.shards) != route.shard:
        raise HoldAgain(Route(route_of(key, capped, state.shards), state.shards))
    try:
        return hold(state)
    except ResourceExhausted as short:
        if route.gather or state.made <= 1 or short.reason not in SHORT:
            raise
        if short.reason == "BUDGET_EXHAUSTED" and state.available < need:
            raise
        raise HoldAgain(Route(route.shard, route.shards, gather=True)) from None


@dataclass(frozen=True)
class Alert:
    """A threshold the pool (category empty) or a category reached, and the capture that did."""

    category: str
    threshold_bp: int
    spent_fen: int
    base_fen: int
    order_id: str
    reached_at: datetime


@dataclass(frozen=True)
class BudgetStatus:
    """A pool as `subsidyctl budget status` shows it: its figures and its sources', each
    category's use, the thresholds reached, the tranches still scheduled."""

    pool: budget.Pool
    categories: list[domain.CategoryUse]
    alerts: list[Alert]
    tranches: list[domain.ScheduledTranche]
    policy_version: str = ""  # the policy in force ("" when catalog could not be asked)
    rules: FundingRules | None = None
    shards: int = 1  # how many shards hold its available budget


async def _was_refused(conn: AsyncConnection, order_id: str) -> bool:
    found = await conn.scalar(
        select(streams_table.c.version).where(streams_table.c.stream_id == refusal_stream(order_id))
    )
    return found is not None


async def _load_hold(conn: AsyncConnection, key: OrderKey, seen: Seen | None = None) -> domain.Hold:
    # Refusals of an order are written under this same pool lock (every shard's, for a pool of
    # several): if one committed while this attempt was locking the qualification, the order is
    # refused for good. Read with the shard's figures, in one round trip, which also ends the
    # order's attempt (its row goes if and only if this hold commits).
    refusal = refusal_stream(key.order_id)
    if key.shard == 0:
        rows = await POOL_FOR_HOLD.all(
            conn, pool_id=key.pool_id, refusal=refusal, order_id=key.order_id
        )
        layout = layout_of(key.pool_id, rows)
        pool, shards, made = (
            (layout.main, layout.shards, layout.made) if layout is not None else (None, 1, 1)
        )
        if seen is not None:  # shard 0's row, read under its lock: the projection's "before"
            seen.layout = layout
        found = rows[0] if rows else None
    else:
        found = await SHARD_FOR_HOLD.first(
            conn, pool_id=key.pool_id, shard=key.shard, refusal=refusal, order_id=key.order_id
        )
        pool, shards, made = shard_of_row(key.pool_id, found)
    if found is not None:
        refused = bool(found.refused)
    else:
        refused = bool(await REFUSED.scalar(conn, refusal=refusal))
    sharded = made > 1
    use = await load_use(conn, key.pool_id, key.category, sharded) if key.category else None
    # A sub-budget is a share of the whole pool's funding (only shard 0's lock changes it).
    total = await load_pool(conn, key.pool_id) if key.category and sharded else None
    available = await load_available(conn, key.pool_id) if sharded else 0
    return domain.Hold(pool, refused, use, total, shards, made, available)


async def _load_settle(
    conn: AsyncConnection, key: OrderKey, seen: Seen | None = None
) -> domain.Settle:
    if not key.watch:  # no thresholds to watch: the reservation alone
        row = await SETTLE_PLAIN.first(conn, order_id=key.order_id)
        rows = [row] if row is not None else []
    else:  # with its category's use, the thresholds reached and the pool, in one round trip
        rows = await SETTLE_WATCHED.all(conn, order_id=key.order_id, category=key.category)
        row = rows[0] if rows else None
    res = reservation_of(row)
    if seen is not None:  # read under the lock: the projection's reservation and platform
        seen.reservation = res
        seen.platform_id = row.platform_id if row is not None else None
    if not key.watch or res is None:
        return domain.Settle(res)
    assert row is not None
    # Its pool's shard 0 and sources (no pool row: the outer join's pool columns are NULL).
    layout = layout_of(key.pool_id, rows) if row.shards is not None else None
    sharded = layout is not None and layout.made > 1
    pool = layout.main if layout is not None else None
    if layout is not None and sharded:  # the whole pool's (summed over its shards)
        _, figures = await load_shards(conn, key.pool_id, layout)
        pool = budget.total(key.pool_id, (figures[k] for k in sorted(figures)))
    if seen is not None and key.shard == 0:
        seen.layout = layout
    use = domain.CategoryUse(key.category, row.use_reserved or 0, row.use_spent or 0)
    if row.use_reserved is None:  # no row for the category yet
        use = domain.CategoryUse(key.category)
    if sharded:
        use = await shards_use(conn, use, key.pool_id)
    alerted = frozenset(zip(row.alert_categories or (), row.alert_thresholds or (), strict=True))
    return domain.Settle(res, pool, use, alerted)


async def _load_held(conn: AsyncConnection, key: OrderKey) -> bool:
    held = await conn.scalar(
        select(reservations_t.c.order_id).where(reservations_t.c.order_id == key.order_id)
    )
    return held is not None


def _order_stream(key: OrderKey) -> str:
    return shard_stream(key.pool_id, key.shard)


def _hold_aggregate(seen: Seen) -> Aggregate[OrderKey, domain.Hold]:
    """The pool shard's stream, its hold state loaded into ``seen`` too."""
    return Aggregate("budget-pool", _order_stream, partial(_load_hold, seen=seen))


def _settle_aggregate(seen: Seen) -> Aggregate[OrderKey, domain.Settle]:
    """The pool shard's stream, its settle state loaded into ``seen`` too."""
    return Aggregate("budget-pool", _order_stream, partial(_load_settle, seen=seen))


TRANCHES: Aggregate[str, list[domain.ScheduledTranche]] = Aggregate(
    "budget-pool", pool_stream, load_pending_tranches
)
REFUSAL: Aggregate[OrderKey, bool] = Aggregate(
    "refusal", lambda k: refusal_stream(k.order_id), _load_held
)


_r = reservations_t.c
ORDER_ROWS = Statement(select(reservations_t).where(ORDER_LINES), name="order_rows")
ROW = Statement(select(reservations_t).where(_r.order_id == bindparam("order_id")), name="row")
_a = attempts_t.c
ATTEMPT_STARTED = Statement(
    pg_insert(attempts_t)
    .values(
        order_id=bindparam("order_id"),
        pool_id=bindparam("pool_id"),
        qualification_id=bindparam("qualification_id"),
        started_at=bindparam("started_at"),
    )
    .on_conflict_do_nothing(),
    name="attempt_started",
)
ATTEMPT_ENDED = Statement(
    attempts_t.delete().where(_a.order_id == bindparam("order_id")), name="attempt_ended"
)


@asynccontextmanager
async def _autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection on which each statement is its own transaction: reads that need no
    snapshot across statements (each would take its own under READ COMMITTED anyway) and the
    attempt's own durable write pay no BEGIN, COMMIT or ROLLBACK round trip (and a ROLLBACK
    would make psycopg drop the connection's prepared statements)."""
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


def _like_prefix(prefix: str) -> str:
    """``prefix`` as a LIKE pattern (escape character ``/``, as ``startswith(autoescape=True)``
    escapes it) matching every string that starts with it."""
    return prefix.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def _order_lines(order_id: str) -> dict[str, str]:
    """ORDER_LINES's parameters: the reservations of the platform's order ``order_id``."""
    return {"order_id": order_id, "prefix": _like_prefix(order_line.lines_prefix(order_id))}


async def _order_rows(conn: AsyncConnection, order_id: str) -> dict[str, dict[str, object]]:
    """The reservations of a platform's order, by key, as rows."""
    rows = await ORDER_ROWS.all(conn, **_order_lines(order_id))
    return {r.order_id: r._asdict() for r in rows}


async def _lines(conn: AsyncConnection, order_id: str) -> dict[str, str]:
    """The reservations of a platform's order (key -> platform)."""
    return {k: str(r["platform_id"]) for k, r in (await _order_rows(conn, order_id)).items()}


def _located(
    order_id: str, item: str, rows: dict[str, dict[str, object]], platform: str | None
) -> tuple[str, dict[str, object] | None]:
    """The key a call names (domain.locate) among its order's rows, and that reservation's row
    (None: unknown, or another platform's)."""
    if platform is not None and any(r["platform_id"] != platform for r in rows.values()):
        lines: frozenset[str] = frozenset()
    else:
        lines = frozenset(rows)
    key = domain.locate(order_id, item, lines)
    row = rows.get(key)
    if row is not None and platform is not None and row["platform_id"] != platform:
        row = None
    return key, row


def _as_command(row: dict[str, object]) -> domain.Reserve:
    return domain.Reserve(
        order_id=str(row["order_id"]),
        platform_id=str(row["platform_id"]),
        pool_id=str(row["pool_id"]),
        consumer_id=str(row["consumer_id"]),
        qualification_id=str(row["qualification_id"]),
        sku=str(row["sku"]),
        unit_price_fen=int(str(row["unit_price_fen"])),
        serial=str(row["serial"]),
        item=order_line.split_line(str(row["order_id"]))[1],
    )


def circumstance_indexes(subjects: Subjects) -> dict[str, str]:
    """The order's circumstances as blind indexes, by kind (never a value, nor the person)."""
    return {k.value: s.index for k, s in subjects.items() if k in CIRCUMSTANCES}


class Ledger(FundingUseCases, SettlementUseCases):
    """Budget pools and the checkout's reserve / capture / release."""

    def __init__(
        self,
        store: EventStore,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        eligibility: eligibility_pb2_grpc.EligibilityServiceAsyncStub,
        *,
        reservation_timeout_s: int = 900,
        abandon_after_s: float = 60.0,
        clock: Callable[[], datetime] | None = None,
        funding_ceiling_fen: int = 10**12,
        keys: vault.Vault,
    ) -> None:
        self.store = store
        self.funding_ceiling_fen = funding_ceiling_fen
        self.catalog = catalog
        self.eligibility = eligibility
        self.timeout = timedelta(seconds=reservation_timeout_s)
        # Far longer than an attempt can take (two deadlines and a pool-lock wait).
        self.abandon_after_s = abandon_after_s
        self.clock = clock or (lambda: datetime.now(UTC))
        self.pipeline = Pipeline(store, SERVICE, apply_event)
        self.risk = LedgerRisk(self.pipeline, keys, self.clock)
        self.reconciliations = Reconciliations(store, self.pipeline)
        self.policies = FundingPolicies(catalog)

    # -- budget ---------------------------------------------------------------------------
    async def get_pool(self, pool_id: str, platform: str | None = None) -> budget.Pool:
        """A pool's figures; a platform reads only the pools assigned to it."""
        async with _autocommit(self.store.engine) as conn:
            pool = await load_pool(conn, pool_id)
            domain.serves(await load_pool_platforms(conn, pool_id), pool_id, platform)
        if pool is None:
            raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
        return pool

    async def budget_status(self, pool_id: str, platform: str | None = None) -> BudgetStatus:
        """A pool's figures and sources, its categories' use, the thresholds it reached and
        the tranches still to come (one read, one snapshot)."""
        async with self.store.engine.connect() as conn, conn.begin():
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            layout = await load_layout(conn, pool_id)
            pool = await load_pool(conn, pool_id)
            domain.serves(await load_pool_platforms(conn, pool_id), pool_id, platform)
            if pool is None or layout is None:
                raise NotFound(
                    "UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id"
                )
            c, a = budget_categories.c, budget_alerts.c
            used = {
                category: (reserved, spent)
                for category, reserved, spent in await conn.execute(
                    select(c.category, c.reserved_fen, c.spent_fen).where(c.pool_id == pool_id)
                )
            }
            if layout.made > 1:  # and what the other shards' orders hold and spent
                for category, (r, sp) in (await load_shard_categories(conn, pool_id)).items():
                    held, paid = used.get(category, (0, 0))
                    used[category] = (held + r, paid + sp)
            categories = [domain.CategoryUse(k, *used[k]) for k in sorted(used)]
            alerts = [
                Alert(*r)
                for r in await conn.execute(
                    select(
                        a.category,
                        a.threshold_bp,
                        a.spent_fen,
                        a.base_fen,
                        a.order_id,
                        a.reached_at,
                    )
                    .where(a.pool_id == pool_id)
                    .order_by(a.reached_at, a.category, a.threshold_bp)
                )
            ]
            tranches = await load_pending_tranches(conn, pool_id)
        try:
            version, rules = await self.policies.in_force()
        except DomainError as err:  # the figures are the ledger's; the rules only explain them
            log.warning("budget status without the policy in force: %s", err.reason)
            return BudgetStatus(pool, categories, alerts, tranches, shards=layout.shards)
        listed = {c.category for c in categories}
        categories += [domain.CategoryUse(c) for c, _ in rules.sub_budgets if c not in listed]
        return BudgetStatus(pool, categories, alerts, tranches, version, rules, layout.shards)

    async def release_due_tranches(self) -> int:
        """Release every scheduled tranche whose time has come, pool by pool under each pool's
        lock; returns how many were released."""
        now = self.clock()
        t = budget_tranches.c
        async with _autocommit(self.store.engine) as conn:
            pools = (
                await conn.execute(
                    select(t.pool_id)
                    .where(t.released.is_(False), t.releases_at <= now)
                    .distinct()
                    .limit(500)
                )
            ).scalars()
            due = list(pools)
        ctx = Context(service_actor(SERVICE), correlation_id="tranches")
        released = 0
        for pool_id in due:
            outcome = await self.pipeline.run(
                TRANCHES, pool_id, lambda pending: domain.release_due(pending or [], now), ctx
            )
            released += len(outcome.appended)
        return released

    # -- checkout -------------------------------------------------------------------------
    async def get_reservation(
        self, order_id: str, platform: str | None = None
    ) -> dict[str, object] | None:
        """The reservation keyed ``order_id`` (an order, or ``order_id/item``); for a platform,
        only its own (another platform's order is as unknown as one that never existed, so ids
        cannot be probed)."""
        async with _autocommit(self.store.engine) as conn:
            row = await self._row(conn, order_id)
        if row is not None and platform is not None and row["platform_id"] != platform:
            return None
        return row

    async def locate(self, order_id: str, item: str, platform: str | None = None) -> str:
        """The key of the reservation a call names: the whole order, or one of its items
        (domain.locate); another platform's order is unknown."""
        async with _autocommit(self.store.engine) as conn:
            rows = await _order_rows(conn, order_id)
        return _located(order_id, item, rows, platform)[0]

    async def reserve(
        self,
        cmd: domain.Reserve,
        actor: common_pb2.Actor,
        circumstances: Circumstances | None = None,
    ) -> dict[str, object]:
        """Verify the item, screen the order against the risk rules and lists, lock the
        qualification, hold the subsidy; idempotent on order id."""
        # One connection for every read: the pool with the order's refusal, the platforms it
        # serves and whether the order has lines (a new order, the common case, has none: one
        # round trip); then the order's lines when it has some.
        async with _autocommit(self.store.engine) as conn:
            order = order_line.order_of(cmd.order_id)
            found = {
                "pool_id": cmd.pool_id,
                "refusal": refusal_stream(cmd.order_id),
                **_order_lines(order),
            }
            pool_rows = await POOL_FOR_ORDER.all(conn, **found)
            head = pool_rows[0] if pool_rows else None
            if head is None:  # no such pool: the rest is read alone
                head = await PLATFORMS_REFUSED.first(conn, **found)
            assert head is not None
            rows = await _order_rows(conn, order) if head.has_lines else {}
            prior = rows.get(cmd.order_id)
            if prior is not None:
                domain.same_order(_as_command(prior), cmd)
                return prior
            domain.new_line(cmd, {k: str(r["platform_id"]) for k, r in rows.items()})
            if head.refused:
                raise domain.order_refused()
            # The order's platform must be one the pool pays (platform_id is the caller's own).
            domain.serves(frozenset(head.platforms or ()), cmd.pool_id, cmd.platform_id)
            layout = layout_of(cmd.pool_id, pool_rows)
            sharded = layout is not None and layout.made > 1
            # The whole pool's figures (a pool of one shard: that row, as read above).
            pool_now = layout.main if layout is not None else None
            if layout is not None and sharded:
                _, figures = await load_shards(conn, cmd.pool_id, layout)
                pool_now = budget.total(cmd.pool_id, (figures[k] for k in sorted(figures)))
        item = await self._verify(cmd)
        screen = self.risk.screen
        subjects = await screen.subjects(
            cmd.consumer_id, circumstances, merchant=item.merchant_id, serial=cmd.serial
        )
        # Refuse what the risk rules, and the budget, already refuse before locking the
        # qualification, so that rejection changes nothing; the decisions under the locks
        # (the subjects', the pool's) still decide races.
        await self._prescreen(cmd, subjects)
        rules = await self.policies.rules(item.policy_version)
        # The category's use is read only when a sub-budget caps it (the common case pays no
        # extra read).
        capped = item.category if rules.sub_budget_bp(item.category) is not None else ""
        use_now = None
        if capped and pool_now is not None:
            async with _autocommit(self.store.engine) as conn:
                use_now = await load_use(conn, cmd.pool_id, capped, sharded)
        domain.check_funds(pool_now, cmd.pool_id, item.category, item.subsidy_fen, rules, use_now)
        shards = layout.shards if layout is not None else 1
        route = Route(route_of(cmd.order_id, capped, shards), shards)
        await self._lock_qualification(cmd, item, actor)
        ctx = Context(
            actor,
            correlation_id=order_line.order_of(cmd.order_id),
            policy_version=item.policy_version,
        )
        now = self.clock()
        expires = now + self.timeout
        indexes = circumstance_indexes(subjects)

        def decide(state: domain.Hold | None, route: Route) -> list[Message]:
            return decide_hold(
                _hold(state),
                route,
                capped,
                cmd.order_id,
                item.subsidy_fen,
                lambda held: domain.hold(held, cmd, item, expires, rules, indexes),
            )

        screening: Screening | None = None
        try:
            for attempt in range(4):  # a changed shard count re-routes; a short shard gathers
                if attempt == 3:  # the count keeps changing: decide with every shard locked
                    route = Route(route.shard, route.shards, gather=True)
                seen = Seen()  # what this attempt's hold reads, for its projection
                try:
                    async with self.store.transaction() as tx:
                        # Counted under the subjects' advisory locks, held until the observation
                        # below commits: two concurrent orders from one device are counted one
                        # after the other.
                        screening = await screen.judge(
                            tx.conn,
                            Action.RESERVE,
                            cmd.consumer_id,
                            cmd.order_id,
                            subjects,
                            now,
                            lock=True,
                        )
                        if screening.verdict.outcome is Outcome.BLOCK:
                            raise RiskBlocked(screening.verdict, screening.decision_id)
                        await screen.observe(tx.conn, screening, now)
                        if route.gather:  # every shard locked, budget moved to this one
                            route = await self._gather(tx, cmd, capped, item.subsidy_fen, ctx)
                        await self._seeing(seen).run(
                            _hold_aggregate(seen),
                            OrderKey(cmd.pool_id, cmd.order_id, capped, shard=route.shard),
                            partial(decide, route=route),
                            ctx,
                            tx=tx,
                            reload=False,  # the answer is the reservation row, as written
                        )
                        # The attempt's row went with the hold's read (POOL_FOR_HOLD).
                        row = seen.row or await self._row(tx.conn, cmd.order_id)
                        assert row is not None
                        return row
                except HoldAgain as again:
                    route = again.route
            raise AssertionError("a hold with every shard locked never asks to be tried again")
        except IntegrityError as exc:
            if SERIAL_CONSTRAINT in str(exc.orig):
                refusal = FailedPrecondition(
                    "SERIAL_ALREADY_SUBSIDISED",
                    "serial: this unit is already held or subsidised by another order",
                    field="serial",
                )
                await self._refuse(
                    cmd.pool_id, cmd.order_id, cmd.qualification_id, refusal.reason, ctx, capped
                )
                raise refusal from None
            # The same order id reserved concurrently (the reservations key refused the second
            # insert, and its whole transaction rolled back): answer with the first one.
            existing = await self.get_reservation(cmd.order_id)
            if existing is None:
                raise
            domain.same_order(_as_command(existing), cmd)
            return existing
        except DomainError as refusal:
            # Refused after the lock (the budget ran out meanwhile, the order was refused
            # while this attempt was locking, or the risk rules block it now): the order is
            # refused for good, which undoes this attempt's lock too.
            await self._refuse(
                cmd.pool_id, cmd.order_id, cmd.qualification_id, refusal.reason, ctx, capped
            )
            if isinstance(refusal, RiskBlocked) and screening is not None:
                await screen.record(screening)
            raise
        finally:
            if screening is not None and screening.verdict.outcome is Outcome.FLAG:
                await screen.record(screening)  # once the hold's transaction has ended

    async def _gather(
        self, tx: Tx, cmd: domain.Reserve, capped: str, need: int, ctx: Context
    ) -> Route:
        """Lock every shard of the pool and move budget to the order's shard from its siblings
        (domain.rebalance), in ``tx``: the hold that follows decides with the whole pool's
        money within reach, so it refuses only when the whole pool cannot pay."""
        layout, figures = await lock_shards(tx, cmd.pool_id)
        shard = route_of(cmd.order_id, capped, layout.shards)
        plan = domain.rebalance(cmd.pool_id, figures, layout.shards, shard, need)
        await append_plan(tx, self.pipeline, cmd.pool_id, plan, ctx)
        return Route(shard, layout.shards, gather=True)

    async def _prescreen(self, cmd: domain.Reserve, subjects: Subjects) -> None:
        """The risk verdict before anything is locked (no advisory locks: a race is decided
        again under them in the hold's transaction). A block is recorded and refused here."""
        early = await self.risk.screen.judge(
            None, Action.RESERVE, cmd.consumer_id, cmd.order_id, subjects, self.clock()
        )
        if early.verdict.outcome is Outcome.BLOCK:
            raise await self.risk.screen.refuse(early)

    async def _verify(self, cmd: domain.Reserve) -> domain.Item:
        try:
            item = await self.catalog.VerifyItem(
                catalog_pb2.VerifyItemRequest(
                    sku=cmd.sku, unit_price_fen=cmd.unit_price_fen, serial=cmd.serial
                )
            )
        except grpc.aio.AioRpcError as err:
            raise as_domain_error(err, "catalog") from err
        if not item.eligible:
            raise FailedPrecondition(
                "ITEM_NOT_ELIGIBLE",
                f"sku: not eligible ({', '.join(item.reasons)})",
                field="sku",
                reasons=",".join(item.reasons),
            )
        return domain.Item(item.merchant_id, item.category, item.subsidy_fen, item.policy_version)

    async def _lock_qualification(
        self, cmd: domain.Reserve, item: domain.Item, actor: common_pb2.Actor
    ) -> None:
        # Durable before the lock: if this process dies before the hold commits, the sweeper
        # finds the attempt and refuses the order, which undoes the lock.
        async with _autocommit(self.store.engine) as conn:
            await ATTEMPT_STARTED.run(
                conn,
                order_id=cmd.order_id,
                pool_id=cmd.pool_id,
                qualification_id=cmd.qualification_id,
                started_at=self.clock(),
            )
        try:
            await self.eligibility.LockQualification(
                eligibility_pb2.LockQualificationRequest(
                    qualification_id=cmd.qualification_id,
                    order_id=cmd.order_id,
                    category=item.category,
                    consumer_id=cmd.consumer_id,
                    platform_id=cmd.platform_id,
                    actor=actor,
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in DEFINITIVE:
                # Eligibility refused: nothing was locked, nothing to undo.
                async with _autocommit(self.store.engine) as conn:
                    await ATTEMPT_ENDED.run(conn, order_id=cmd.order_id)
            # Otherwise (a deadline, a dropped connection) the lock may have committed: the
            # attempt stays, and a retry completes it or the sweeper refuses it.
            raise as_domain_error(err, "eligibility") from err

    @staticmethod
    async def _row(conn: AsyncConnection, order_id: str) -> dict[str, object] | None:
        row = await ROW.first(conn, order_id=order_id)
        return row._asdict() if row is not None else None

    def _seeing(self, seen: Seen) -> Pipeline:
        """The service's pipeline, its projection handed what the command read under its lock
        (``seen``), so that the checkout's projection reads none of it again."""
        return Pipeline(self.store, SERVICE, partial(apply_event, seen=seen))

    async def _refuse(
        self,
        pool_id: str,
        order_id: str,
        qualification_id: str,
        reason: str,
        ctx: Context,
        capped: str | None = None,
    ) -> None:
        """Refuse the order for good after its qualification was locked: eligibility unlocks the
        qualification when the event reaches it. Written under the pool's stream lock, like
        every hold, so an order is either reserved or refused, never both: for a pool of
        several shards, the lock of the shard the order is routed to (``capped``: the category
        routed by its sub-budget), or every shard's when the route is not known."""
        async with self.store.transaction() as tx:
            peek = await load_layout(tx.conn, pool_id)
            if peek is None or peek.made <= 1 or capped is None:
                await tx.lock_stream(pool_stream(pool_id))
                # Read under shard 0's lock, which every change of the count takes.
                layout = await load_layout(tx.conn, pool_id)
                if layout is not None and layout.made > 1:
                    await lock_shards(tx, pool_id)
            else:
                shard = route_of(order_id, capped, peek.shards)
                await tx.lock_stream(shard_stream(pool_id, shard))
                # The count changes only under every shard's lock, this one's too: as read now,
                # it is the count any hold of this order is routed by while this lock is held.
                _, shards, _ = await load_shard(tx.conn, pool_id, shard)
                if route_of(order_id, capped, shards) != shard:  # it changed meanwhile (rare)
                    await lock_shards(tx, pool_id)
            await tx.conn.execute(attempts_t.delete().where(attempts_t.c.order_id == order_id))
            await self.pipeline.run(
                REFUSAL,
                OrderKey(pool_id, order_id),
                lambda held: domain.refuse(bool(held), order_id, pool_id, qualification_id, reason),
                ctx,
                tx=tx,
            )

    async def sweep_abandoned(self, older_than_s: float) -> int:
        """Refuse every order whose attempt outlived ``older_than_s`` without a hold (the ledger
        died between locking the qualification and the hold): its qualification is freed."""
        cutoff = self.clock() - timedelta(seconds=older_than_s)
        async with _autocommit(self.store.engine) as conn:
            stale = (
                await conn.execute(
                    select(attempts_t).where(attempts_t.c.started_at < cutoff).limit(500)
                )
            ).all()
        actor = service_actor(SERVICE)
        for row in stale:
            await self._refuse(
                row.pool_id,
                row.order_id,
                row.qualification_id,
                "ABANDONED",
                Context(actor, correlation_id=row.order_id),
            )
        return len(stale)

    async def _settle(
        self,
        order_id: str,
        actor: common_pb2.Actor,
        decide: Callable[[domain.Settle, FundingRules], list[Message]],
        platform: str | None = None,
        *,
        watch: bool = False,
        item: str | None = None,
    ) -> dict[str, object]:
        """Capture or release one order under its pool's lock (a platform: only its own).
        With ``watch``, the decision gets the funding rules of the order's policy version and,
        when they have alert thresholds, the pool's figures, the category's use and the alerts
        raised; otherwise it reads the order alone. With ``item`` (a call naming a platform's
        order and maybe an item), the reservation is located first (:meth:`locate`), in the
        same read."""
        async with self.store.transaction() as tx:
            # Read in the transaction, before any lock (as a read of its own would be: each
            # statement sees what committed before it), so the call pays one BEGIN and COMMIT.
            if item is None:
                existing = await self._row(tx.conn, order_id)
                if existing is not None and platform is not None:
                    existing = existing if existing["platform_id"] == platform else None
            else:
                order_id, existing = _located(
                    order_id, item, await _order_rows(tx.conn, order_id), platform
                )
            if existing is None:
                raise domain.unknown_order(order_id)
            version = str(existing["policy_version"])
            rules = await self.policies.rules(version) if watch else domain.DEFAULT_RULES
            key = OrderKey(
                str(existing["pool_id"]),
                order_id,
                str(existing["category"]),
                watch=bool(rules.alert_thresholds_bp),
                shard=int(str(existing["shard"])),
            )
            ctx = Context(
                actor, correlation_id=order_line.order_of(order_id), policy_version=version
            )
            if key.watch and key.shard:
                # Thresholds are of the whole pool: captures that watch them queue on shard 0's
                # lock too (shard 0 first, as every multi-stream lock), so each sees the ones
                # before it and a threshold is raised once.
                await tx.lock_stream(pool_stream(key.pool_id))
            seen = Seen()
            outcome = await self._seeing(seen).run(
                _settle_aggregate(seen),
                key,
                lambda state: decide(state or domain.Settle(None), rules),
                ctx,
                tx=tx,
                reload=False,
            )
            row = seen.row  # the reservation's row as the projection wrote it
            if any(
                isinstance(e := payload_of(env), ev.SubsidyReleased) and e.was_captured
                for env in outcome.appended
            ):  # a refund: clawed back if a settlement batch included the order
                await self.claw_back(tx, order_id, str(existing["merchant_id"]), ctx)
                row = None  # read again after the clawback's projection
            row = row or await self._row(tx.conn, order_id)
        assert row is not None
        return row

    async def capture(
        self,
        order_id: str,
        payment_ref: str,
        actor: common_pb2.Actor,
        platform: str | None,
        paid_amount_fen: int | None = None,
        item: str = "",
    ) -> dict[str, object]:
        """Post the order's (or its item's) subsidy (each source pays what it held), the paid
        amount checked by the order's policy version, and raise the thresholds the capture
        reaches."""
        return await self._settle(
            order_id,
            actor,
            lambda state, rules: domain.capture_and_alert(
                state, payment_ref, rules, paid_amount_fen
            ),
            platform,
            watch=True,
            item=item,
        )

    async def release(
        self,
        order_id: str,
        reason: str,
        actor: common_pb2.Actor,
        platform: str | None,
        item: str = "",
    ) -> dict[str, object]:
        """Void or refund the order, or one item of it (the other items stay as they are):
        each source gets back what it held or paid for exactly that reservation."""
        return await self._settle(
            order_id,
            actor,
            lambda state, _: domain.release(state.reservation, reason),
            platform,
            item=item,
        )

    async def expire_due(self) -> int:
        """Release every pending reservation past its timeout; returns how many."""
        async with _autocommit(self.store.engine) as conn:
            due = (
                (
                    await conn.execute(
                        select(reservations_t.c.order_id)
                        .where(reservations_t.c.status == domain.PENDING)
                        .where(reservations_t.c.expires_at < self.clock())
                        .limit(500)
                    )
                )
                .scalars()
                .all()
            )
        actor = service_actor(SERVICE)
        for order_id in due:
            try:
                await self._settle(
                    order_id, actor, lambda state, _: domain.release(state.reservation, "EXPIRED")
                )
            except FailedPrecondition:
                pass  # captured meanwhile: nothing to expire
        return len(due)

    async def expiry_loop(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Expire due reservations, undo abandoned attempts and release due tranches every
        ``every_s`` until ``stop``."""

        async def sweep() -> None:
            await self.expire_due()
            await self.sweep_abandoned(self.abandon_after_s)
            await self.release_due_tranches()

        await every(stop, every_s, sweep, log=log, failure="expiry sweep failed", alert="expiry")


def _hold(state: domain.Hold | None) -> domain.Hold:
    assert state is not None  # _load_hold always answers
    return state


__all__ = ["Ledger", "budget_pools"]
