"""Catalog read models fed by events.

Two families:

- the catalog's own state (policies, switches, merchants, products, price history), updated in
  the same transaction as the append of the catalog's events (:func:`apply_event`);
- the sales orders learnt from the ledger's events (:func:`apply_ledger_event`), the source of
  the serial bindings and of the sales ledger (销售台账). Each ledger event merges into its
  order's row monotonically (RESERVED < CAPTURED < RELEASED, flags only ever set), so applying
  the events again, or in another order, gives the same rows: the projection can be dropped
  and replayed from the events alone while the live consumer keeps running.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import (
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
    case,
    delete,
    insert,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Envelope, payload_of
from subsidy.v1 import events_pb2 as ev

from . import domain

metadata = MetaData()

# Approved (published) versions: what quotes and verifications use.
policies = Table(
    "policies",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
)
# Every version ever drafted, with who drafted and who approved it: readable forever.
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),
    Column("drafted_by", String(64), nullable=False),
    Column("draft_reason", Text, nullable=False),
    Column("drafted_at", DateTime(timezone=True), nullable=False),
    Column("approved_by", String(64), nullable=False, server_default=""),
    Column("approve_reason", Text, nullable=False, server_default=""),
    Column("approved_at", DateTime(timezone=True)),
)
# One row per pause in force: scope is "campaign" or "category:<code>".
switches = Table(
    "switches",
    metadata,
    Column("scope", String(80), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("actor_id", String(64), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
)
merchants = Table(
    "merchants",
    metadata,
    Column("merchant_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("licence_number", String(32), nullable=False),
    Column("contact_masked", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=False, server_default=""),
)
products = Table(
    "products",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("merchant_id", String(64), nullable=False, index=True),
    Column("category", String(64), nullable=False),
    Column("grade", Integer, nullable=False),
    Column("brand", String(100), nullable=False),
    Column("model", String(100), nullable=False),
    Column("energy_label_code", String(64), nullable=False),
    Column("list_price_fen", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
)
price_history = Table(
    "price_history",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("effective_at", DateTime(timezone=True), nullable=False),
    Column("price_fen", BigInteger, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Index("price_history_by_time", "sku", "effective_at"),
)
sales_orders = Table(
    "sales_orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("sku", String(64), nullable=False, server_default=""),
    Column("merchant_id", String(64), nullable=False, server_default=""),
    Column("category", String(64), nullable=False, server_default=""),
    Column("platform_id", String(64), nullable=False, server_default=""),
    Column("serial", String(64), nullable=False, server_default=""),
    Column("unit_price_fen", BigInteger, nullable=False, server_default="0"),
    Column("subsidy_fen", BigInteger, nullable=False, server_default="0"),
    Column("policy_version", String(64), nullable=False, server_default=""),
    Column("status", String(16), nullable=False),
    Column("captured", Boolean, nullable=False, server_default="false"),
    Column("refunded", Boolean, nullable=False, server_default="false"),
    Column("release_reason", String(16), nullable=False, server_default=""),
    Column("reserved_at", DateTime(timezone=True)),
    Column("captured_at", DateTime(timezone=True)),
    Column("released_at", DateTime(timezone=True)),
    Index("sales_orders_by_serial", "serial", postgresql_where="serial <> ''"),
    Index("sales_orders_by_merchant", "merchant_id", "sku"),
)

CAMPAIGN_SCOPE = "campaign"
LEDGER_SUBJECTS = (
    "events.ledger.SubsidyReserved",
    "events.ledger.SubsidyCaptured",
    "events.ledger.SubsidyReleased",
)


def category_scope(category: str) -> str:
    return f"category:{category}"


def occurred(env: Envelope) -> datetime:
    return env.occurred_at.ToDatetime(tzinfo=UTC)


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one of the catalog's own events to its read models."""
    event = payload_of(env)
    at = occurred(env)
    actor = env.actor.id
    if isinstance(event, ev.PolicyDrafted):
        await conn.execute(
            insert(policy_versions).values(
                version=event.version,
                document=event.policy_json,
                effective_from=event.effective_from.ToDatetime(tzinfo=UTC),
                status=domain.DRAFT,
                drafted_by=actor,
                draft_reason=event.reason,
                drafted_at=at,
            )
        )
    elif isinstance(event, ev.PolicyApproved):
        await conn.execute(
            update(policy_versions)
            .where(policy_versions.c.version == event.version)
            .values(
                status=domain.APPROVED,
                approved_by=actor,
                approve_reason=event.reason,
                approved_at=at,
            )
        )
    elif isinstance(event, ev.PolicyPublished):
        json.loads(event.policy_json)  # a stored policy is always valid JSON
        effective_from = event.effective_from.ToDatetime(tzinfo=UTC)
        await conn.execute(
            insert(policies).values(
                version=event.version, document=event.policy_json, effective_from=effective_from
            )
        )
        # The shipped default is published by the service itself, without a draft.
        await conn.execute(
            pg_insert(policy_versions)
            .values(
                version=event.version,
                document=event.policy_json,
                effective_from=effective_from,
                status=domain.APPROVED,
                drafted_by=actor,
                draft_reason="shipped default policy",
                drafted_at=at,
                approved_by=actor,
                approve_reason="shipped default policy",
                approved_at=at,
            )
            .on_conflict_do_nothing()
        )
    elif isinstance(event, ev.CategoryPaused | ev.CampaignPaused):
        scope = (
            category_scope(event.category)
            if isinstance(event, ev.CategoryPaused)
            else CAMPAIGN_SCOPE
        )
        await conn.execute(
            insert(switches).values(scope=scope, reason=event.reason, actor_id=actor, since=at)
        )
    elif isinstance(event, ev.CategoryResumed):
        await conn.execute(
            delete(switches).where(switches.c.scope == category_scope(event.category))
        )
    elif isinstance(event, ev.CampaignResumed):
        await conn.execute(delete(switches).where(switches.c.scope == CAMPAIGN_SCOPE))
    elif isinstance(event, ev.MerchantApplied):
        await conn.execute(
            insert(merchants).values(
                merchant_id=event.merchant_id,
                name=event.name,
                licence_number=event.licence_number,
                contact_masked=event.contact_masked,
                status=domain.APPLIED,
            )
        )
    elif isinstance(event, ev.MerchantReviewed):
        await _merchant_status(
            conn,
            event.merchant_id,
            domain.APPROVED if event.approved else domain.REJECTED,
            event.reason,
        )
    elif isinstance(event, ev.MerchantSuspended):
        await _merchant_status(conn, event.merchant_id, domain.SUSPENDED, event.reason)
    elif isinstance(event, ev.MerchantReinstated):
        await _merchant_status(conn, event.merchant_id, domain.APPROVED, event.reason)
    elif isinstance(event, ev.ProductRegistered):
        await project_registered(conn, [(env, event)])
    elif isinstance(event, ev.ProductPriceChanged):
        await conn.execute(
            update(products)
            .where(products.c.sku == event.sku)
            .values(list_price_fen=event.new_price_fen)
        )
        await conn.execute(
            insert(price_history).values(
                sku=event.sku,
                event_id=env.event_id,
                effective_at=at,
                price_fen=event.new_price_fen,
                reason=event.reason,
            )
        )
    elif isinstance(event, ev.ProductDelisted):
        await conn.execute(
            update(products).where(products.c.sku == event.sku).values(status=domain.DELISTED)
        )
    # ProductsImported only closes an import: its products came in their own events.


async def _merchant_status(
    conn: AsyncConnection, merchant_id: str, status: str, reason: str
) -> None:
    await conn.execute(
        update(merchants)
        .where(merchants.c.merchant_id == merchant_id)
        .values(status=status, status_reason=reason)
    )


async def project_registered(
    conn: AsyncConnection, registered: Sequence[tuple[Envelope, ev.ProductRegistered]]
) -> None:
    """Insert registered products and their first price, in two batched statements."""
    if not registered:
        return
    await conn.execute(
        insert(products),
        [
            {
                "sku": e.sku,
                "merchant_id": e.merchant_id,
                "category": e.category,
                "grade": e.grade,
                "brand": e.brand,
                "model": e.model,
                "energy_label_code": e.energy_label_code,
                "list_price_fen": e.list_price_fen,
                "status": domain.LISTED,
            }
            for _, e in registered
        ],
    )
    await conn.execute(
        insert(price_history),
        [
            {
                "sku": e.sku,
                "event_id": env.event_id,
                "effective_at": occurred(env),
                "price_fen": e.list_price_fen,
                "reason": "registered",
            }
            for env, e in registered
        ],
    )


# --------------------------------------------------------------------------------------------
# Sales orders, from the ledger's events


async def apply_ledger_event(conn: AsyncConnection, env: Envelope) -> None:
    """Merge one ledger event into its order's row; idempotent and order-independent."""
    event = payload_of(env)
    at = occurred(env)
    t = sales_orders
    if isinstance(event, ev.SubsidyReserved):
        details = {
            "sku": event.sku,
            "merchant_id": event.merchant_id,
            "category": event.category,
            "platform_id": event.platform_id,
            "serial": event.serial,
            "unit_price_fen": event.unit_price_fen,
            "subsidy_fen": event.subsidy_fen,
            "policy_version": env.policy_version,
            "reserved_at": at,
        }
        stmt = pg_insert(t).values(order_id=event.order_id, status=domain.RESERVED, **details)
        await conn.execute(stmt.on_conflict_do_update(index_elements=[t.c.order_id], set_=details))
    elif isinstance(event, ev.SubsidyCaptured):
        stmt = pg_insert(t).values(
            order_id=event.order_id,
            status=domain.CAPTURED,
            captured=True,
            subsidy_fen=event.subsidy_fen,
            captured_at=at,
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.c.order_id],
                set_={
                    "captured": True,
                    "captured_at": at,
                    # never back from RELEASED
                    "status": case(
                        (t.c.status == domain.RELEASED, domain.RELEASED), else_=domain.CAPTURED
                    ),
                },
            )
        )
    elif isinstance(event, ev.SubsidyReleased):
        stmt = pg_insert(t).values(
            order_id=event.order_id,
            status=domain.RELEASED,
            captured=event.was_captured,
            refunded=event.was_captured,
            release_reason=event.reason,
            released_at=at,
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.c.order_id],
                set_={
                    "status": domain.RELEASED,
                    "captured": t.c.captured | event.was_captured,
                    "refunded": t.c.refunded | event.was_captured,
                    "release_reason": event.reason,
                    "released_at": at,
                },
            )
        )
