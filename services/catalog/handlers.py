"""Catalog use cases: load, decide (services/catalog/domain.py), append.

Policies, emergency switches, merchants, products and prices are the catalog's own streams;
sales orders and serial bindings are learnt from the ledger's events. ``verify_item`` is the
checkout's hot path: one SQL round trip plus in-memory policy and switch state, which a
background loop refreshes from the database twice a second so every replica sees a pause or a
new policy version within a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from services.contract.personal_data import InvalidPhone, mask_phone, validate_phone
from services.contract.policy import (
    Policy,
    PolicyError,
    Quote,
    default_policy,
    policy_from_dict,
    policy_from_text,
    policy_json,
)
from services.contract.policy import quote as quote_policy
from services.invariants import InvariantViolation, check_serial_once
from services.kernel import validate
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.kernel.events import Context, Envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore, Tx, WrongExpectedVersion
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import domain
from .domain import ItemFacts, ItemVerdict, Pause, PolicyRecord, Switches
from .projections import (
    CAMPAIGN_SCOPE,
    apply_event,
    apply_ledger_event,
    merchants,
    policies,
    policy_versions,
    price_history,
    products,
    sales_orders,
    switches,
)

SERVICE = "catalog"
SWITCHES_STREAM = "switches"
log = logging.getLogger(__name__)
# Unified social credit code (统一社会信用代码): 18 characters, no I, O, Z, S, V.
LICENCE = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}$")
MAX_GRADE = 5
MAX_POLICY_BYTES = 256 * 1024
MAX_REASON = 500
REFRESH_EVERY_S = 0.5  # a pause or a new version reaches every replica well within a second


def policy_stream(version: str) -> str:
    return f"policy/{version}"


def merchant_stream(merchant_id: str) -> str:
    return f"merchant/{merchant_id}"


def product_stream(sku: str) -> str:
    return f"product/{sku}"


def operator_context(actor: common_pb2.Actor, reason: str) -> Context:
    """Validate an operator's identity and reason; the reason travels on the envelope's actor."""
    validate.identifier("actor.id", actor.id)
    domain.require_operator(actor)
    return Context(common_pb2.Actor(kind=actor.kind, id=actor.id, reason=reason))


def check_reason(reason: str) -> str:
    return validate.text_field("reason", reason, max_len=MAX_REASON)


def check_grade(grade: int) -> int:
    if grade < 0 or grade > MAX_GRADE:
        raise InvalidArgument("INVALID_GRADE", "grade: 0 (none) or 1..5", field="grade")
    return grade


def check_product(policy: Policy, req: ev.ProductRegistered) -> None:
    """Validate a product registration (the same rules for one product and for imports)."""
    validate.identifier("sku", req.sku)
    validate.identifier("merchant_id", req.merchant_id)
    validate.text_field("category", req.category, max_len=64)
    validate.text_field("brand", req.brand, max_len=100)
    validate.text_field("model", req.model, max_len=100)
    validate.text_field("energy_label_code", req.energy_label_code, max_len=64, required=False)
    validate.price_fen("list_price_fen", req.list_price_fen)
    check_grade(req.grade)
    if policy.category(req.category) is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY", "category: not a category of the policy in force", field="category"
        )


# The facts VerifyItem needs, in one round trip: the product, its merchant, the prices in force
# during the baseline window (the last one set before the window opened, and every later one),
# and the order holding the serial, if any.
_ITEM_FACTS = text(
    """
    SELECT p.sku, p.category, p.grade, p.merchant_id, p.status AS product_status,
           coalesce(m.status, '') AS merchant_status, h.prices, h.times,
           s.order_id AS serial_order, s.status AS serial_status
    FROM products p
    LEFT JOIN merchants m ON m.merchant_id = p.merchant_id
    LEFT JOIN LATERAL (
        SELECT array_agg(ph.price_fen ORDER BY ph.effective_at, ph.event_id) AS prices,
               array_agg(ph.effective_at ORDER BY ph.effective_at, ph.event_id) AS times
        FROM price_history ph
        WHERE ph.sku = p.sku AND ph.effective_at >= coalesce(
            (SELECT max(effective_at) FROM price_history
             WHERE sku = p.sku AND effective_at <= :window_start),
            '-infinity'::timestamptz)
    ) h ON true
    LEFT JOIN LATERAL (
        SELECT o.order_id, o.status FROM sales_orders o
        WHERE o.serial = :serial AND o.serial <> '' AND o.status IN ('RESERVED', 'CAPTURED')
        ORDER BY (o.status = 'CAPTURED') DESC, o.reserved_at
        LIMIT 1
    ) s ON true
    WHERE p.sku = :sku
    """
)


class Catalog:
    """The catalog's use cases, over its event store."""

    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.now = clock or (lambda: datetime.now(UTC))
        self._policies: dict[str, Policy] = {}
        self._switches = Switches()
        # VerifyItem is one SELECT: autocommit saves the BEGIN and ROLLBACK round trips.
        self._reads = store.engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _emit(
        self, tx: Tx, stream: str, version: int, events: list[Message], ctx: Context
    ) -> None:
        await tx.emit(SERVICE, stream, version, events, ctx, apply_event)

    # -- refresh (policies and switches, from the database) ---------------------------------
    async def refresh(self) -> None:
        """Load new approved policy versions and the switch state from the database."""
        async with self.store.engine.connect() as conn:
            versions = (await conn.execute(select(policies.c.version))).scalars().all()
            missing = [v for v in versions if v not in self._policies]
            if missing:
                rows = await conn.execute(
                    select(policies.c.version, policies.c.document).where(
                        policies.c.version.in_(missing)
                    )
                )
                for version, document in rows:
                    self._policies[version] = policy_from_dict(json.loads(document))
            paused = (await conn.execute(select(switches))).all()
        campaign: Pause | None = None
        categories: dict[str, Pause] = {}
        for row in paused:
            pause = Pause(row.reason, row.actor_id, row.since)
            if row.scope == CAMPAIGN_SCOPE:
                campaign = pause
            else:
                categories[row.scope.removeprefix("category:")] = pause
        self._switches = Switches(campaign, categories)

    async def refresh_loop(self, stop: asyncio.Event, every_s: float = REFRESH_EVERY_S) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:
                log.exception("catalog refresh failed", extra={"alert": "catalog-refresh"})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    @property
    def switches(self) -> Switches:
        return self._switches

    # -- policy ---------------------------------------------------------------------------
    async def ensure_default_policy(self) -> None:
        """Publish the shipped default policy once, so a fresh catalog can answer."""
        await self.refresh()
        if self._policies:
            return
        policy = default_policy()
        published = ev.PolicyPublished(version=policy.version, policy_json=policy_json(policy))
        published.effective_from.FromDatetime(policy.effective_from.astimezone(UTC))
        try:
            async with self.store.transaction() as tx:
                await self._emit(
                    tx,
                    policy_stream(policy.version),
                    0,
                    [published],
                    Context(service_actor(SERVICE), correlation_id="default-policy"),
                )
        except (WrongExpectedVersion, IntegrityError):
            pass  # another replica published it first
        await self.refresh()

    def policy(self, version: str = "", at: datetime | None = None) -> Policy:
        """The named approved version, or the one in force at ``at`` (now)."""
        if version:
            validate.identifier("policy_version", version)
            found = self._policies.get(version)
            if found is None:
                raise NotFound(
                    "UNKNOWN_POLICY_VERSION",
                    f"policy_version: no approved policy {version!r}",
                    field="policy_version",
                )
            return found
        at = at or self.now()
        in_force = [p for p in self._policies.values() if p.effective_from <= at]
        if not in_force:
            raise FailedPrecondition("NO_POLICY_IN_FORCE", "no subsidy policy is in force")
        return max(in_force, key=lambda p: p.effective_from)

    async def _policy_record(self, conn: Any, version: str) -> PolicyRecord | None:
        row = (
            await conn.execute(select(policy_versions).where(policy_versions.c.version == version))
        ).first()
        if row is None:
            return None
        return PolicyRecord(
            row.version, row.status, row.effective_from, row.drafted_by, row.approved_by
        )

    async def draft_policy(
        self, document: str, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        """An operator proposes a policy version (YAML or JSON); nothing changes until approved."""
        ctx = operator_context(actor, check_reason(reason))
        if not document.strip():
            raise InvalidArgument("MISSING_FIELD", "document: required", field="document")
        if len(document.encode()) > MAX_POLICY_BYTES:
            raise InvalidArgument(
                "FIELD_TOO_LONG", f"document: at most {MAX_POLICY_BYTES} bytes", field="document"
            )
        try:
            policy = policy_from_text(document)
        except PolicyError as exc:
            located = exc.path and not exc.path.startswith(("line ", "yaml"))
            where = f"document.{exc.path}" if located else "document"
            raise InvalidArgument(
                "INVALID_POLICY",
                f"{where}: {exc.problem}",
                field=where,
                **({} if located else {"location": exc.path}),
            ) from None
        stream = policy_stream(policy.version)
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            existing = await self._policy_record(tx.conn, policy.version)
            events = domain.draft_policy(
                existing, policy, policy_json(policy), ctx.actor.reason, self.now()
            )
            await self._emit(tx, stream, version, events, ctx)
        return await self.policy_version(policy.version)

    async def approve_policy(
        self, version: str, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        """A second person approves a draft; it is in force from its effective_from on."""
        validate.identifier("version", version)
        ctx = operator_context(actor, check_reason(reason))
        stream = policy_stream(version)
        async with self.store.transaction() as tx:
            stream_version = await tx.lock_stream(stream)
            record = await self._policy_record(tx.conn, version)
            document = (
                await tx.conn.scalar(
                    select(policy_versions.c.document).where(policy_versions.c.version == version)
                )
            ) or ""
            events = domain.approve_policy(
                record, document, ctx.actor, ctx.actor.reason, self.now()
            )
            await self._emit(tx, stream, stream_version, events, ctx)
        await self.refresh()
        return await self.policy_version(version)

    async def policy_version(self, version: str = "") -> dict[str, Any]:
        """One version (draft or approved) with its maker and checker; empty = in force now."""
        if not version:
            version = self.policy().version
        validate.identifier("version", version)
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
            in_force = self.policy().version == row["version"]
        except FailedPrecondition:
            in_force = False
        return {**row, "in_force": in_force}

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

    def quote(self, category: str, grade: int, price_fen: int, version: str = "") -> Quote:
        """The subsidy for one item under one approved policy version (default: in force)."""
        check_grade(grade)
        validate.price_fen("price_fen", price_fen)
        validate.text_field("category", category, max_len=64)
        policy = self.policy(version)
        if policy.category(category) is None:
            raise InvalidArgument(
                "UNKNOWN_CATEGORY",
                f"category: {policy.version} has no category {category!r}",
                field="category",
            )
        return quote_policy(policy, category, grade or None, price_fen)

    # -- emergency switches ---------------------------------------------------------------
    async def _switch(
        self,
        actor: common_pb2.Actor,
        reason: str,
        decide: Callable[[Switches], list[Message]],
    ) -> Switches:
        ctx = operator_context(actor, check_reason(reason))
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(SWITCHES_STREAM)
            await self.refresh()  # decide on the committed state, not a second-old copy
            events = decide(self._switches)
            await self._emit(tx, SWITCHES_STREAM, version, events, ctx)
        await self.refresh()
        return self._switches

    async def pause_category(self, category: str, actor: common_pb2.Actor, reason: str) -> Switches:
        validate.text_field("category", category, max_len=64)
        policy = self.policy()
        return await self._switch(
            actor, reason, lambda s: domain.pause_category(s, policy, category, reason.strip())
        )

    async def resume_category(
        self, category: str, actor: common_pb2.Actor, reason: str
    ) -> Switches:
        validate.text_field("category", category, max_len=64)
        return await self._switch(
            actor, reason, lambda s: domain.resume_category(s, category, reason.strip())
        )

    async def pause_campaign(self, actor: common_pb2.Actor, reason: str) -> Switches:
        return await self._switch(actor, reason, lambda s: domain.pause_campaign(s, reason.strip()))

    async def resume_campaign(self, actor: common_pb2.Actor, reason: str) -> Switches:
        return await self._switch(
            actor, reason, lambda s: domain.resume_campaign(s, reason.strip())
        )

    # -- merchants ------------------------------------------------------------------------
    async def apply_merchant(
        self, merchant_id: str, name: str, licence: str, phone: str, actor: common_pb2.Actor
    ) -> dict[str, Any]:
        validate.identifier("merchant_id", merchant_id)
        name = validate.text_field("name", name, max_len=200)
        licence = licence.strip().upper()
        if not LICENCE.match(licence):
            raise InvalidArgument(
                "INVALID_LICENCE",
                "licence_number: an 18-character unified social credit code",
                field="licence_number",
            )
        try:
            masked = mask_phone(validate_phone(phone))
        except InvalidPhone as exc:
            raise InvalidArgument(
                exc.reason, f"contact_phone: {exc}", field="contact_phone"
            ) from None
        event = ev.MerchantApplied(
            merchant_id=merchant_id, name=name, licence_number=licence, contact_masked=masked
        )
        try:
            async with self.store.transaction() as tx:
                await self._emit(tx, merchant_stream(merchant_id), 0, [event], Context(actor))
        except (WrongExpectedVersion, IntegrityError):
            raise AlreadyExists(
                "MERCHANT_EXISTS",
                f"merchant_id: {merchant_id} has applied already",
                field="merchant_id",
            ) from None
        return await self.merchant(merchant_id)

    async def merchant(self, merchant_id: str) -> dict[str, Any]:
        validate.identifier("merchant_id", merchant_id)
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(select(merchants).where(merchants.c.merchant_id == merchant_id))
            ).first()
        if row is None:
            raise NotFound(
                "UNKNOWN_MERCHANT", f"merchant_id: no merchant {merchant_id!r}", field="merchant_id"
            )
        return dict(row._mapping)

    async def _merchant_verb(
        self,
        merchant_id: str,
        ctx: Context,
        decide: Callable[[str], list[Message]],
    ) -> dict[str, Any]:
        validate.identifier("merchant_id", merchant_id)
        stream = merchant_stream(merchant_id)
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            status = await tx.conn.scalar(
                select(merchants.c.status).where(merchants.c.merchant_id == merchant_id)
            )
            if status is None:
                raise NotFound(
                    "UNKNOWN_MERCHANT",
                    f"merchant_id: no merchant {merchant_id!r}",
                    field="merchant_id",
                )
            await self._emit(tx, stream, version, decide(status), ctx)
        return await self.merchant(merchant_id)

    async def review_merchant(
        self, merchant_id: str, approve: bool, reason: str, actor: common_pb2.Actor
    ) -> dict[str, Any]:
        """Approve, or reject with a reason."""
        validate.identifier("merchant_id", merchant_id)
        reason = validate.text_field("reason", reason, max_len=MAX_REASON, required=not approve)
        return await self._merchant_verb(
            merchant_id,
            Context(common_pb2.Actor(kind=actor.kind, id=actor.id, reason=reason)),
            lambda status: domain.review_merchant(merchant_id, status, approve, reason),
        )

    async def suspend_merchant(
        self, merchant_id: str, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        validate.identifier("merchant_id", merchant_id)
        ctx = operator_context(actor, check_reason(reason))
        return await self._merchant_verb(
            merchant_id,
            ctx,
            lambda status: domain.suspend_merchant(merchant_id, status, ctx.actor.reason),
        )

    async def reinstate_merchant(
        self, merchant_id: str, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        validate.identifier("merchant_id", merchant_id)
        ctx = operator_context(actor, check_reason(reason))
        return await self._merchant_verb(
            merchant_id,
            ctx,
            lambda status: domain.reinstate_merchant(merchant_id, status, ctx.actor.reason),
        )

    # -- products -------------------------------------------------------------------------
    async def register_product(
        self, req: ev.ProductRegistered, actor: common_pb2.Actor
    ) -> dict[str, Any]:
        check_product(self.policy(), req)
        await self.merchant(req.merchant_id)  # must exist (approval is checked at verification)
        try:
            async with self.store.transaction() as tx:
                await self._emit(tx, product_stream(req.sku), 0, [req], Context(actor))
        except (WrongExpectedVersion, IntegrityError):
            raise AlreadyExists(
                "PRODUCT_EXISTS", f"sku: {req.sku} is registered already", field="sku"
            ) from None
        return await self.product(req.sku)

    async def _product_verb(
        self, sku: str, ctx: Context, decide: Callable[[Any], list[Message]]
    ) -> dict[str, Any]:
        validate.identifier("sku", sku)
        stream = product_stream(sku)
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            row = (
                await tx.conn.execute(
                    select(products).where(products.c.sku == sku).with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound("UNKNOWN_SKU", f"sku: no product {sku!r}", field="sku")
            await self._emit(tx, stream, version, decide(row), ctx)
        return await self.product(sku)

    async def update_price(
        self, sku: str, list_price_fen: int, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        """A new list price: kept in the price history the baseline is derived from."""
        validate.identifier("sku", sku)
        validate.price_fen("list_price_fen", list_price_fen)
        ctx = operator_context(actor, check_reason(reason))
        return await self._product_verb(
            sku,
            ctx,
            lambda row: domain.change_price(
                sku, row.status, row.list_price_fen, list_price_fen, ctx.actor.reason
            ),
        )

    async def delist_product(
        self, sku: str, actor: common_pb2.Actor, reason: str
    ) -> dict[str, Any]:
        validate.identifier("sku", sku)
        ctx = operator_context(actor, check_reason(reason))
        return await self._product_verb(
            sku, ctx, lambda row: domain.delist(sku, row.status, ctx.actor.reason)
        )

    async def product(self, sku: str) -> dict[str, Any]:
        """A product with its current price baseline under the policy in force."""
        validate.identifier("sku", sku)
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(products).where(products.c.sku == sku))).first()
            if row is None:
                raise NotFound("UNKNOWN_SKU", f"sku: no product {sku!r}", field="sku")
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
    async def verify_item(
        self, sku: str, unit_price_fen: int, serial: str, version: str = ""
    ) -> ItemVerdict:
        """Every reason an item at this price is not eligible, or its subsidy."""
        validate.identifier("sku", sku)
        validate.price_fen("unit_price_fen", unit_price_fen)
        if serial:
            serial = validate.serial("serial", serial)
        now = self.now()
        policy = self.policy(version, at=now)
        window_start = now - timedelta(days=policy.baseline_window_days)
        async with self._reads.connect() as conn:
            row = (
                await conn.execute(
                    _ITEM_FACTS, {"sku": sku, "serial": serial, "window_start": window_start}
                )
            ).first()
        facts = None
        if row is not None:
            facts = ItemFacts(
                sku=row.sku,
                category=row.category,
                grade=row.grade,
                merchant_id=row.merchant_id,
                merchant_status=row.merchant_status,
                product_status=row.product_status,
                price_history=tuple(zip(row.times or (), row.prices or (), strict=True)),
                serial_order=row.serial_order or "",
                serial_order_status=row.serial_status or "",
            )
        return domain.verdict(policy, facts, self._switches, unit_price_fen, now)

    # -- sales orders and units, from the ledger's events ----------------------------------
    async def on_ledger_event(self, tx: Tx, env: Envelope) -> None:
        """Consumer of the ledger's reservation events (services/catalog/service.py)."""
        await apply_ledger_event(tx.conn, env)
        event = payload_of(env)
        if isinstance(event, ev.SubsidyCaptured):
            serial = await tx.conn.scalar(
                select(sales_orders.c.serial).where(sales_orders.c.order_id == event.order_id)
            )
            if serial:
                try:
                    await self._check_serial(tx.conn, serial)
                except InvariantViolation:
                    # Two captures raced past VerifyItem: the ledger must claw one back.
                    log.error(
                        "one unit subsidised twice",
                        extra={"alert": "serial-double-subsidy", "order_id": event.order_id},
                    )

    async def _check_serial(self, conn: Any, serial: str) -> None:
        rows = await conn.execute(
            select(sales_orders.c.serial, sales_orders.c.order_id).where(
                sales_orders.c.serial == serial,
                sales_orders.c.status == domain.CAPTURED,
            )
        )
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


__all__ = ["Catalog", "ItemVerdict", "PolicyError"]
