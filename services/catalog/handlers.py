"""Catalog use cases: policies, merchants, products and the checkout's item verification."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from services.eligibility.identity import InvalidPhone, mask_phone, validate_phone
from services.kernel import validate
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.events import Context, service_actor
from services.kernel.eventstore import EventStore, WrongExpectedVersion
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from .policy import Policy, PolicyError, Quote, default_policy, policy_from_dict, policy_to_dict
from .policy import quote as quote_policy
from .projections import apply_event, merchants, policies, products

SERVICE = "catalog"
log = logging.getLogger(__name__)
# Unified social credit code (统一社会信用代码): 18 characters, no I, O, Z, S, V.
LICENCE = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}$")
MAX_GRADE = 5


@dataclass(frozen=True)
class ItemVerdict:
    eligible: bool
    reasons: tuple[str, ...]
    category: str
    grade: int
    merchant_id: str
    quote: Quote | None
    policy_version: str


class Catalog:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._policies: dict[str, Policy] = {}

    # -- policy ---------------------------------------------------------------------------
    async def refresh_policies(self) -> None:
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(select(policies.c.version, policies.c.document))).all()
        for version, document in rows:
            if version not in self._policies:
                self._policies[version] = policy_from_dict(json.loads(document))

    async def ensure_default_policy(self) -> None:
        """Publish the shipped default policy once, so a fresh catalog can answer."""
        await self.refresh_policies()
        if self._policies:
            return
        policy = default_policy()
        published = ev.PolicyPublished(
            version=policy.version,
            policy_json=json.dumps(policy_to_dict(policy), sort_keys=True, ensure_ascii=False),
        )
        published.effective_from.FromDatetime(policy.effective_from.astimezone(UTC))
        try:
            async with self.store.transaction() as tx:
                await tx.emit(
                    SERVICE,
                    f"policy/{policy.version}",
                    0,
                    [published],
                    Context(service_actor(SERVICE), correlation_id="default-policy"),
                    apply_event,
                )
        except WrongExpectedVersion:
            pass  # another replica published it first
        await self.refresh_policies()

    async def refresh_loop(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.refresh_policies()
            except Exception:
                log.exception("policy refresh failed", extra={"alert": "policy-refresh"})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    def policy(self, version: str = "", at: datetime | None = None) -> Policy:
        """The named version, or the one in force at ``at`` (now)."""
        if version:
            validate.identifier("policy_version", version)
            found = self._policies.get(version)
            if found is None:
                raise NotFound(
                    "UNKNOWN_POLICY_VERSION", f"policy_version: no policy {version!r}",
                    field="policy_version",
                )
            return found
        at = at or datetime.now(UTC)
        in_force = [p for p in self._policies.values() if p.effective_from <= at]
        if not in_force:
            raise FailedPrecondition("NO_POLICY_IN_FORCE", "no subsidy policy is in force")
        return max(in_force, key=lambda p: p.effective_from)

    def quote(self, category: str, grade: int, price_fen: int, version: str = "") -> Quote:
        if grade < 0 or grade > MAX_GRADE:
            raise InvalidArgument("INVALID_GRADE", "grade: 0 (none) or 1..5", field="grade")
        validate.price_fen("price_fen", price_fen)
        validate.text_field("category", category, max_len=64)
        return quote_policy(self.policy(version), category, grade or None, price_fen)

    # -- merchants ------------------------------------------------------------------------
    async def apply_merchant(
        self, merchant_id: str, name: str, licence: str, phone: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
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
            raise InvalidArgument(exc.reason, f"contact_phone: {exc}", field="contact_phone") from None
        event = ev.MerchantApplied(
            merchant_id=merchant_id, name=name, licence_number=licence, contact_masked=masked
        )
        try:
            async with self.store.transaction() as tx:
                await tx.emit(
                    SERVICE, f"merchant/{merchant_id}", 0, [event], Context(actor), apply_event
                )
        except WrongExpectedVersion:
            raise AlreadyExists(
                "MERCHANT_EXISTS", f"merchant_id: {merchant_id} has applied already",
                field="merchant_id",
            ) from None
        return await self.merchant(merchant_id)

    async def merchant(self, merchant_id: str) -> dict[str, object]:
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(select(merchants).where(merchants.c.merchant_id == merchant_id))
            ).first()
        if row is None:
            raise NotFound("UNKNOWN_MERCHANT", f"merchant_id: no merchant {merchant_id!r}",
                           field="merchant_id")
        return dict(row._mapping)

    async def review_merchant(
        self, merchant_id: str, approve: bool, reason: str, actor: common_pb2.Actor
    ) -> dict[str, object]:
        validate.identifier("merchant_id", merchant_id)
        reason = validate.text_field("reason", reason, max_len=500, required=not approve)
        stream = f"merchant/{merchant_id}"
        async with self.store.transaction() as tx:
            version = await tx.lock_stream(stream)
            if version == 0:
                raise NotFound("UNKNOWN_MERCHANT", f"merchant_id: no merchant {merchant_id!r}",
                               field="merchant_id")
            status = (
                await tx.conn.execute(
                    select(merchants.c.status).where(merchants.c.merchant_id == merchant_id)
                )
            ).scalar_one()
            if status != "APPLIED":
                raise FailedPrecondition(
                    "MERCHANT_ALREADY_REVIEWED", f"merchant_id: {merchant_id} is {status}",
                    field="merchant_id",
                )
            event = ev.MerchantReviewed(merchant_id=merchant_id, approved=approve, reason=reason)
            await tx.emit(SERVICE, stream, version, [event], Context(actor), apply_event)
        return await self.merchant(merchant_id)

    # -- products -------------------------------------------------------------------------
    async def register_product(self, req: ev.ProductRegistered, actor: common_pb2.Actor) -> dict[str, object]:
        validate.identifier("sku", req.sku)
        validate.identifier("merchant_id", req.merchant_id)
        validate.text_field("brand", req.brand, max_len=100)
        validate.text_field("model", req.model, max_len=100)
        validate.text_field("energy_label_code", req.energy_label_code, max_len=64, required=False)
        validate.price_fen("list_price_fen", req.list_price_fen)
        if req.grade < 0 or req.grade > MAX_GRADE:
            raise InvalidArgument("INVALID_GRADE", "grade: 0 (none) or 1..5", field="grade")
        if self.policy().category(req.category) is None:
            raise InvalidArgument(
                "UNKNOWN_CATEGORY", f"category: not a category of the policy in force",
                field="category",
            )
        await self.merchant(req.merchant_id)  # must exist (approval is checked at verification)
        try:
            async with self.store.transaction() as tx:
                await tx.emit(SERVICE, f"product/{req.sku}", 0, [req], Context(actor), apply_event)
        except WrongExpectedVersion:
            raise AlreadyExists("PRODUCT_EXISTS", f"sku: {req.sku} is registered already",
                                field="sku") from None
        product = await self.product(req.sku)
        assert product is not None
        return product

    async def product(self, sku: str) -> dict[str, object] | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(products).where(products.c.sku == sku))).first()
        return dict(row._mapping) if row else None

    async def verify_item(self, sku: str, unit_price_fen: int, serial: str, version: str = "") -> ItemVerdict:
        """Every reason an item at this price is not eligible, or its subsidy."""
        validate.identifier("sku", sku)
        validate.price_fen("unit_price_fen", unit_price_fen)
        if serial:
            validate.identifier("serial", serial)
        policy = self.policy(version)
        async with self.store.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(products, merchants.c.status.label("merchant_status"))
                    .join(merchants, merchants.c.merchant_id == products.c.merchant_id)
                    .where(products.c.sku == sku)
                )
            ).first()
        if row is None:
            return ItemVerdict(False, ("UNKNOWN_SKU",), "", 0, "", None, policy.version)
        reasons: list[str] = []
        if row.merchant_status != "APPROVED":
            reasons.append("MERCHANT_NOT_APPROVED")
        if row.status != "LISTED":
            reasons.append("PRODUCT_DELISTED")
        q = quote_policy(policy, row.category, row.grade or None, unit_price_fen)
        reasons += q.reasons
        return ItemVerdict(
            eligible=not reasons and q.eligible,
            reasons=tuple(reasons),
            category=row.category,
            grade=row.grade,
            merchant_id=row.merchant_id,
            quote=q,
            policy_version=policy.version,
        )


def timestamp(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


__all__ = ["Catalog", "ItemVerdict", "PolicyError"]
