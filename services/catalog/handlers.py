"""Catalog use cases: take a validated command, run it through the kernel's pipeline, return.

Each use case is a few lines: the command comes from ``requests.py`` (validated at the edge),
the decision from ``domain/``, and :class:`~services.kernel.pipeline.Pipeline` locks the
aggregate's stream, loads its state (``projections.load_*``), decides, appends and projects in
one transaction. The four aggregates are declared once below.

Policies, emergency switches, merchants, products and prices are the catalog's own streams;
sales orders and serial bindings are learnt from the ledger's events. ``verify_item`` is the
checkout's hot path: its share of one prepared statement for every call in flight
(``items.py``: the product, its merchant, the serial's order, the price history only when the
product's stream moved, and the versions of the switches and policies; or, when the catalog
clock says no product, merchant or price changed since the product was read, the row kept in
memory), with the policy and switch state in memory, reloaded before answering when that read
shows another replica changed them. A background loop refreshes them twice a second as well,
for Quote and GetSwitches on an idle replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import bindparam, select, text

from services.invariants import InvariantViolation, check_serial_once
from services.kernel.background import every
from services.kernel.contract.policy import (
    Policy,
    Quote,
    default_policy,
    in_force,
    named_version,
    policy_from_json,
)
from services.kernel.errors import DomainError, FailedPrecondition, NotFound
from services.kernel.events import Context, Envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Outcome, Pipeline
from services.kernel.readmodels import load_new_rows
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain
from .domain import ItemFacts, ItemVerdict, Merchant, Pause, PolicyRecord, Product, Switches
from .items import CachedHistory, ItemReads, autocommit_engine, in_window
from .projections import (
    CAMPAIGN_SCOPE,
    apply_event,
    apply_events,
    apply_ledger_event,
    load_merchant,
    load_policy_version,
    load_product,
    load_products,
    load_switches,
    policies,
    policy_versions,
    price_history,
    products,
    sales_orders,
)
from .requests import ItemQuery, QuoteQuery

SERVICE: Final = "catalog"
SWITCHES_STREAM: Final = "switches"
REFRESH_EVERY_S: Final = 0.5  # a pause or a new version reaches every replica well within a second
log = logging.getLogger(__name__)


def policy_stream(version: str) -> str:
    return f"policy/{version}"


def merchant_stream(merchant_id: str) -> str:
    return f"merchant/{merchant_id}"


def product_stream(sku: str) -> str:
    return f"product/{sku}"


# The catalog's aggregates: how each one's stream is named and its state loaded.
POLICY_VERSION: Final[Aggregate[str, PolicyRecord]] = Aggregate(
    "policy version", policy_stream, load_policy_version
)
SWITCHES: Final[Aggregate[None, Switches]] = Aggregate(
    "switches", lambda _: SWITCHES_STREAM, load_switches
)
MERCHANT: Final[Aggregate[str, Merchant]] = Aggregate("merchant", merchant_stream, load_merchant)
PRODUCT: Final[Aggregate[str, Product]] = Aggregate(
    "product", product_stream, load_product, load_many=load_products
)


# The policy and switch state's freshness in one statement: the switch stream's version with
# every pause in force (one row of NULLs when none is), and how many versions are approved.
_SWITCH_STATE = Statement(
    text(
        """
        SELECT v.switches_v, v.policies, s.scope, s.reason, s.actor_id, s.since
        FROM (SELECT coalesce((SELECT version FROM streams WHERE stream_id = :switches), 0)
                     AS switches_v,
                     (SELECT count(*) FROM policies) AS policies) v
        LEFT JOIN switches s ON true
        ORDER BY s.scope
        """
    ),
    name="switch state",
)


_CAPTURED_WITH_SERIAL = Statement(
    select(sales_orders.c.serial, sales_orders.c.order_id).where(
        sales_orders.c.serial == bindparam("serial"),
        sales_orders.c.status == domain.CAPTURED,
    ),
    name="captured orders of a serial",
)


class Catalog:
    """The catalog's use cases, over its event store."""

    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.now = clock or (lambda: datetime.now(UTC))
        self.pipeline = Pipeline(store, SERVICE, apply_event, project_many=apply_events)
        self._policies: dict[str, Policy] = {}
        self._switches = Switches()
        self._switches_v = -1  # the switch stream's version self._switches is at
        self._reads = autocommit_engine(store.engine)  # the refresh's single SELECTs
        self.items = ItemReads(store.engine, product_stream(""), SWITCHES_STREAM)
        self._catching_up = asyncio.Lock()
        self._checked_at = -REFRESH_EVERY_S  # loop time a read last found both up to date

    # -- refresh (policies and switches, from the database) ---------------------------------
    async def refresh(self) -> None:
        """Load new approved policy versions and the switch state from the database (the
        switches only when their stream moved, the policies only when there are more)."""
        async with self._reads.connect() as conn:
            rows = await _SWITCH_STATE.all(conn, switches=SWITCHES_STREAM)
            if rows[0].policies != len(self._policies):
                await load_new_rows(
                    conn,
                    policies.c.version,
                    policies.c.document,
                    self._policies,
                    policy_from_json,
                )
        version = rows[0].switches_v
        if version > self._switches_v:  # never back to an older state read before a newer one
            campaign: Pause | None = None
            categories: dict[str, Pause] = {}
            for row in rows:
                if row.scope is None:
                    continue
                pause = Pause(row.reason, row.actor_id, row.since)
                if row.scope == CAMPAIGN_SCOPE:
                    campaign = pause
                else:
                    categories[row.scope.removeprefix("category:")] = pause
            self._switches, self._switches_v = Switches(campaign, categories), version
        self._checked_at = asyncio.get_running_loop().time()

    async def _refresh_if_idle(self) -> None:
        # VerifyItem's reads check both on every call: while they come, nothing to do here.
        if asyncio.get_running_loop().time() - self._checked_at >= REFRESH_EVERY_S:
            await self.refresh()

    async def refresh_loop(self, stop: asyncio.Event, every_s: float = REFRESH_EVERY_S) -> None:
        """Refresh every ``every_s`` until ``stop``, so a replica sees an approval in time."""
        await every(
            stop,
            every_s,
            self._refresh_if_idle,
            log=log,
            failure="catalog refresh failed",
            alert="catalog-refresh",
        )

    async def _catch_up(self, switches_v: int, approved: int) -> None:
        """Reload the policies and switches if a read saw them newer than this replica has
        them (another replica changed them); one reload for every call that saw it."""
        if switches_v <= self._switches_v and approved <= len(self._policies):
            self._checked_at = asyncio.get_running_loop().time()
            return
        async with self._catching_up:
            # A reload that began after this call's read has brought both at least that far.
            if switches_v > self._switches_v or approved > len(self._policies):
                await self.refresh()

    @property
    def switches(self) -> Switches:
        return self._switches

    # -- policy ---------------------------------------------------------------------------
    async def ensure_default_policy(self, initial: Policy | None = None) -> None:
        """Publish the campaign's first policy once (``initial``, by default the shipped one),
        so a fresh catalog can answer."""
        await self.refresh()
        if self._policies:
            return
        policy = initial or default_policy()
        ctx = Context(service_actor(SERVICE), correlation_id="default-policy")
        # Another replica publishing it first leaves nothing to do (the decision sees it).
        await self.pipeline.run(
            POLICY_VERSION, policy.version, lambda s: domain.publish_default(s, policy), ctx
        )
        await self.refresh()

    def policy(self, version: str = "", at: datetime | None = None) -> Policy:
        """The named approved version (unknown: NotFound), or the one in force at ``at``."""
        if version:
            return named_version(self._policies, version)
        return in_force(self._policies.values(), at or self.now())

    async def draft_policy(self, command: domain.DraftPolicy, ctx: Context) -> dict[str, Any]:
        """An operator proposes a policy version; nothing changes until it is approved."""
        now = self.now()
        version = command.policy.version
        await self.pipeline.run(
            POLICY_VERSION, version, lambda s: domain.draft_policy(s, command, now), ctx
        )
        return await self.policy_version(version)

    async def approve_policy(self, command: domain.ApprovePolicy, ctx: Context) -> dict[str, Any]:
        """A second person approves a draft; it is in force from its effective_from on."""
        now = self.now()
        await self.pipeline.run(
            POLICY_VERSION, command.version, lambda s: domain.approve_policy(s, command, now), ctx
        )
        await self.refresh()
        return await self.policy_version(command.version)

    async def policy_version(self, version: str = "") -> dict[str, Any]:
        """One version (draft or approved) with its maker and checker; empty = in force now."""
        if not version:
            version = self.policy().version
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(policy_versions).where(policy_versions.c.version == version)
                )
            ).first()
        if row is None:
            raise NotFound(
                "UNKNOWN_POLICY_VERSION", f"version: no policy {version!r}", field="version"
            )
        return self._version_row(dict(row._mapping))

    def _version_row(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            current = self.policy().version == row["version"]
        except FailedPrecondition:  # no version in force yet
            current = False
        return {**row, "in_force": current}

    async def list_policies(self) -> list[dict[str, Any]]:
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(policy_versions).order_by(
                        policy_versions.c.effective_from, policy_versions.c.version
                    )
                )
            ).all()
        return [self._version_row(dict(r._mapping)) for r in rows]

    def quote(self, query: QuoteQuery) -> Quote:
        """The subsidy for one item under one approved policy version (default: in force)."""
        policy = self.policy(query.policy_version)
        return domain.quote_category(policy, query.category, query.grade, query.price_fen)

    # -- emergency switches ---------------------------------------------------------------
    def _switched(self, outcome: Outcome[Switches]) -> Switches:
        if outcome.version >= self._switches_v:  # this replica applies it at once
            self._switches, self._switches_v = outcome.state or Switches(), outcome.version
        return outcome.state or Switches()

    async def pause_category(self, command: domain.PauseCategory, ctx: Context) -> Switches:
        policy = self.policy()
        return self._switched(
            await self.pipeline.run(
                SWITCHES, None, lambda s: domain.pause_category(s, command, policy), ctx
            )
        )

    async def resume_category(self, command: domain.ResumeCategory, ctx: Context) -> Switches:
        return self._switched(
            await self.pipeline.run(
                SWITCHES, None, lambda s: domain.resume_category(s, command), ctx
            )
        )

    async def pause_campaign(self, command: domain.PauseCampaign, ctx: Context) -> Switches:
        return self._switched(
            await self.pipeline.run(
                SWITCHES, None, lambda s: domain.pause_campaign(s, command), ctx
            )
        )

    async def resume_campaign(self, command: domain.ResumeCampaign, ctx: Context) -> Switches:
        return self._switched(
            await self.pipeline.run(
                SWITCHES, None, lambda s: domain.resume_campaign(s, command), ctx
            )
        )

    # -- merchants ------------------------------------------------------------------------
    async def apply_merchant(self, command: domain.ApplyMerchant, ctx: Context) -> dict[str, Any]:
        return _merchant_row(
            await self.pipeline.run(
                MERCHANT, command.merchant_id, lambda s: domain.apply_merchant(s, command), ctx
            )
        )

    async def review_merchant(self, command: domain.ReviewMerchant, ctx: Context) -> dict[str, Any]:
        """Approve, or reject with a reason."""
        return _merchant_row(
            await self.pipeline.run(
                MERCHANT, command.merchant_id, lambda s: domain.review_merchant(s, command), ctx
            )
        )

    async def suspend_merchant(
        self, command: domain.SuspendMerchant, ctx: Context
    ) -> dict[str, Any]:
        return _merchant_row(
            await self.pipeline.run(
                MERCHANT, command.merchant_id, lambda s: domain.suspend_merchant(s, command), ctx
            )
        )

    async def reinstate_merchant(
        self, command: domain.ReinstateMerchant, ctx: Context
    ) -> dict[str, Any]:
        return _merchant_row(
            await self.pipeline.run(
                MERCHANT, command.merchant_id, lambda s: domain.reinstate_merchant(s, command), ctx
            )
        )

    async def merchant(self, merchant_id: str) -> dict[str, Any]:
        async with self.store.engine.connect() as conn:
            found = await load_merchant(conn, merchant_id)
        if found is None:
            raise domain.merchant.unknown_merchant(merchant_id)
        return asdict(found)

    # -- products -------------------------------------------------------------------------
    async def register_product(
        self, command: domain.RegisterProduct, ctx: Context
    ) -> dict[str, Any]:
        policy = self.policy()
        # Read outside the product's lock: a merchant, once applied, is never removed.
        async with self.store.engine.connect() as conn:
            known = await load_merchant(conn, command.merchant_id) is not None
        await self.pipeline.run(
            PRODUCT,
            command.sku,
            lambda s: domain.register_product(s, command, policy, known),
            ctx,
        )
        return await self.product(command.sku)

    async def update_price(self, command: domain.ChangePrice, ctx: Context) -> dict[str, Any]:
        """A new list price: kept in the price history the baseline is derived from."""
        await self.pipeline.run(
            PRODUCT, command.sku, lambda s: domain.change_price(s, command), ctx
        )
        return await self.product(command.sku)

    async def delist_product(self, command: domain.Delist, ctx: Context) -> dict[str, Any]:
        await self.pipeline.run(PRODUCT, command.sku, lambda s: domain.delist(s, command), ctx)
        return await self.product(command.sku)

    async def product(self, sku: str) -> dict[str, Any]:
        """A product with its current price baseline under the policy in force."""
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(products).where(products.c.sku == sku))).first()
            if row is None:
                raise domain.product.unknown_sku(sku)
            history = await self._history(conn, sku)
        policy = self.policy()
        baseline = domain.price_baseline(
            [(h["effective_at"], h["price_fen"]) for h in history],
            self.now(),
            policy.baseline_window_days,
        )
        return {**row._mapping, "baseline_fen": baseline or 0}

    async def _history(self, conn: Any, sku: str) -> list[dict[str, Any]]:
        rows = await conn.execute(
            select(price_history.c.price_fen, price_history.c.effective_at, price_history.c.reason)
            .where(price_history.c.sku == sku)
            .order_by(price_history.c.effective_at, price_history.c.event_id)
        )
        return [dict(r._mapping) for r in rows]

    async def price_history(self, sku: str) -> tuple[list[dict[str, Any]], int, int]:
        """Every list price the product ever had, its baseline, and the window in days."""
        product = await self.product(sku)
        async with self.store.engine.connect() as conn:
            history = await self._history(conn, sku)
        return history, int(product["baseline_fen"]), self.policy().baseline_window_days

    # -- the checkout's hot path ----------------------------------------------------------
    async def verify_item(self, query: ItemQuery) -> ItemVerdict:
        """Every reason an item at this price is not eligible, or its subsidy."""
        now = self.now()
        try:
            window = self.policy(query.policy_version, at=now).baseline_window_days
        except DomainError:  # decided again (or refused) once the read has caught up
            window = 0
        start = now - timedelta(days=window)
        row, history = await self.items.read(query.sku, query.serial, start)
        await self._catch_up(row.switches_v, row.policies)
        policy = self.policy(query.policy_version, at=now)
        start = now - timedelta(days=policy.baseline_window_days)
        if history is not None and history.start > start:
            # Another version came in force, with a longer window: read what it needs.
            row, history = await self.items.read(query.sku, query.serial, start)
        facts = None
        if row.sku is not None and history is not None:
            facts = ItemFacts(
                sku=row.sku,
                category=row.category,
                grade=row.grade,
                merchant_id=row.merchant_id,
                merchant_status=row.merchant_status,
                product_status=row.product_status,
                price_history=_prices(history, start),
                serial_order=row.serial_order or "",
                serial_order_status=row.serial_status or "",
            )
        return domain.verdict(policy, facts, self._switches, query.unit_price_fen, now)

    # -- sales orders and units, from the ledger's events ----------------------------------
    async def on_ledger_event(self, tx: Tx, env: Envelope) -> None:
        """Consumer of the ledger's reservation events (services/catalog/service.py)."""
        # A capture's merge returns the order's serial: the unit it subsidised, if known.
        serial = await apply_ledger_event(tx.conn, env)
        if serial:
            try:
                await self._check_serial(tx.conn, serial)
            except InvariantViolation:
                # Two captures raced past VerifyItem: the ledger must claw one back.
                event = payload_of(env)
                order_id = event.order_id if isinstance(event, ev.SubsidyCaptured) else ""
                log.error(
                    "one unit subsidised twice",
                    extra={"alert": "serial-double-subsidy", "order_id": order_id},
                )

    async def _check_serial(self, conn: Any, serial: str) -> None:
        rows = await _CAPTURED_WITH_SERIAL.all(conn, serial=serial)
        check_serial_once([(r.serial, r.order_id) for r in rows])

    async def check_serials(self) -> None:
        """The invariant over every unit: no serial bound to two captured subsidies."""
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                select(sales_orders.c.serial, sales_orders.c.order_id).where(
                    sales_orders.c.serial != "", sales_orders.c.status == domain.CAPTURED
                )
            )
            check_serial_once([(r.serial, r.order_id) for r in rows])


def _prices(history: CachedHistory, start: datetime) -> tuple[tuple[datetime, int], ...]:
    if history.start > start:  # pragma: no cover - verify_item reads it again first
        raise AssertionError("a price history read for a later window")
    return in_window(history.history, start)


def _merchant_row(outcome: Outcome[Merchant]) -> dict[str, Any]:
    if outcome.state is None:  # pragma: no cover - a decision that appended made one
        raise AssertionError("a merchant command left no merchant")
    return asdict(outcome.state)


__all__ = [
    "MERCHANT",
    "POLICY_VERSION",
    "PRODUCT",
    "SWITCHES",
    "Catalog",
    "ItemVerdict",
]
