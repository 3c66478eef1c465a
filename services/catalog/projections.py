"""Catalog read models fed by events.

Two families:

- the catalog's own state (policies, switches, merchants, products, price history), updated in
  the same transaction as the append of the catalog's events (:func:`apply_event`). Each row is
  an aggregate's state: the ``load_*`` functions read it (the command pipeline loads state with
  them, under the stream's lock), and every change is the aggregate's own ``evolve`` applied to
  it, so how a status changes is written once, in ``domain/``;
- the sales orders learnt from the ledger's events (:func:`apply_ledger_event`), the source of
  the serial bindings and of the sales ledger (销售台账). Each ledger event merges into its
  order's row monotonically (RESERVED < CAPTURED < RELEASED, flags only ever set), so applying
  the events again, or in another order, gives the same rows: the projection can be dropped
  and replayed from the events alone while the live consumer keeps running.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    DDL,
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
    Uuid,
    any_,
    bindparam,
    case,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.contract.policy import policy_from_json, policy_json, policy_of
from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import Xid8
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain
from .domain import Merchant, Meta, Pause, PolicyRecord, Product, Switches
from .domain import merchant as merchant_rules
from .domain import policy_version as policy_rules
from .domain import product as product_rules
from .domain import switches as switch_rules

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
# What VerifyItem reads of a product, its merchant and its prices changes only when one of
# those three tables does: every transaction that writes one of them moves this counter, at
# its commit (a deferred trigger on each, :func:`clock_ddl`; the last lock the transaction
# takes, so it cannot be part of a deadlock, and once per transaction, not per row). A
# replica that read rows at one ``mark`` and reads the same mark later knows no such change has
# committed in between, and answers from memory (items.py). The mark is random, not the count:
# a database restored from a backup, then written to, counts up through values a replica may
# have seen before, but never draws a mark it has seen.
catalog_clock = Table(
    "catalog_clock",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("v", BigInteger, nullable=False),  # how many transactions moved it (for people)
    Column("mark", Uuid(as_uuid=False), nullable=False),
    Column("tx", Xid8()),  # the transaction that moved it last: once per transaction
)
CLOCKED: Final = ("products", "merchants", "price_history")


def clock_ddl() -> list[str]:
    """The statements that make the counter move (idempotent: the migration that adds it and
    ``create_all`` on a scratch database both run them)."""
    statements = [
        "INSERT INTO catalog_clock (id, v, mark) VALUES (1, 0, gen_random_uuid())"
        " ON CONFLICT (id) DO NOTHING",
        """
        CREATE OR REPLACE FUNCTION catalog_clock_tick() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE catalog_clock
            SET v = v + 1, mark = gen_random_uuid(), tx = pg_current_xact_id()
            WHERE id = 1 AND tx IS DISTINCT FROM pg_current_xact_id();
            RETURN NULL;
        END
        $$
        """,
    ]
    for table in CLOCKED:
        statements += [
            f"DROP TRIGGER IF EXISTS catalog_clock_tick ON {table}",
            f"CREATE CONSTRAINT TRIGGER catalog_clock_tick AFTER INSERT OR UPDATE OR DELETE"
            f" ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            f" EXECUTE FUNCTION catalog_clock_tick()",
        ]
    return statements


for _statement in clock_ddl():
    event.listen(metadata, "after_create", DDL(_statement))  # type: ignore[no-untyped-call]

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


def meta_of(env: Envelope) -> Meta:
    return Meta(occurred(env), env.actor.id)


# --------------------------------------------------------------------------------------------
# Loading each aggregate's state from its read model (under its stream's lock, in a command)


async def load_policy_version(conn: AsyncConnection, version: str) -> PolicyRecord | None:
    row = (
        await conn.execute(select(policy_versions).where(policy_versions.c.version == version))
    ).first()
    if row is None:
        return None
    return PolicyRecord(
        policy=policy_from_json(row.document),
        status=row.status,
        drafted_by=row.drafted_by,
        draft_reason=row.draft_reason,
        drafted_at=row.drafted_at,
        approved_by=row.approved_by,
        approve_reason=row.approve_reason,
        approved_at=row.approved_at,
    )


async def load_switches(conn: AsyncConnection, _: object = None) -> Switches:
    campaign: Pause | None = None
    categories: dict[str, Pause] = {}
    for row in await conn.execute(select(switches)):
        pause = Pause(row.reason, row.actor_id, row.since)
        if row.scope == CAMPAIGN_SCOPE:
            campaign = pause
        else:
            categories[row.scope.removeprefix("category:")] = pause
    return Switches(campaign, categories)


async def load_merchant(conn: AsyncConnection, merchant_id: str) -> Merchant | None:
    row = (
        await conn.execute(select(merchants).where(merchants.c.merchant_id == merchant_id))
    ).first()
    return Merchant(**row._mapping) if row is not None else None


async def load_products(conn: AsyncConnection, skus: Sequence[str]) -> dict[str, Product]:
    # One array parameter, not one per SKU: an import asks for thousands at once.
    wanted = bindparam("skus", list(skus), type_=ARRAY(String))
    rows = await conn.execute(select(products).where(products.c.sku == any_(wanted)))
    return {row.sku: Product(**row._mapping) for row in rows}


async def load_product(conn: AsyncConnection, sku: str) -> Product | None:
    return (await load_products(conn, [sku])).get(sku)


# --------------------------------------------------------------------------------------------
# Applying the catalog's own events: each aggregate's evolve decides the new state


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one of the catalog's own events to its read models."""
    event = payload_of(env)
    if isinstance(event, POLICY_EVENTS):
        await _policy_event(conn, event, env)
    elif isinstance(event, SWITCH_EVENTS):
        before = await load_switches(conn)
        await _save_switches(conn, before, switch_rules.evolve(before, event, meta_of(env)))
    elif isinstance(event, MERCHANT_EVENTS):
        merchant = await load_merchant(conn, event.merchant_id)
        await _save_merchant(conn, merchant_rules.evolve(merchant, event))
    elif isinstance(event, ev.ProductRegistered):
        await project_registered(conn, [(env, event)])
    elif isinstance(event, ev.ProductPriceChanged | ev.ProductDelisted):
        after = product_rules.evolve(await load_product(conn, event.sku), event)
        await conn.execute(
            update(products)
            .where(products.c.sku == after.sku)
            .values(status=after.status, list_price_fen=after.list_price_fen)
        )
        if isinstance(event, ev.ProductPriceChanged):
            await conn.execute(
                insert(price_history).values(
                    sku=event.sku,
                    event_id=env.event_id,
                    effective_at=occurred(env),
                    price_fen=after.list_price_fen,
                    reason=event.reason,
                )
            )
    # ProductsImported only closes an import: its products came in their own streams.


async def apply_events(conn: AsyncConnection, envs: Sequence[Envelope]) -> None:
    """Apply many events in order, registrations in batched statements (the bulk import)."""
    registered: list[tuple[Envelope, ev.ProductRegistered]] = []
    for env in envs:
        event = payload_of(env)
        if isinstance(event, ev.ProductRegistered):
            registered.append((env, event))
            continue
        await project_registered(conn, registered)
        registered = []
        await apply_event(conn, env)
    await project_registered(conn, registered)


POLICY_EVENTS = (ev.PolicyDrafted, ev.PolicyApproved, ev.PolicyPublished)
SWITCH_EVENTS = (ev.CategoryPaused, ev.CategoryResumed, ev.CampaignPaused, ev.CampaignResumed)
MERCHANT_EVENTS = (
    ev.MerchantApplied,
    ev.MerchantReviewed,
    ev.MerchantSuspended,
    ev.MerchantReinstated,
)


async def _policy_event(
    conn: AsyncConnection,
    event: ev.PolicyDrafted | ev.PolicyApproved | ev.PolicyPublished,
    env: Envelope,
) -> None:
    before = await load_policy_version(conn, event.version)
    after = policy_rules.evolve(before, event, meta_of(env))
    if after != before:
        values = {
            "document": policy_json(after.policy),
            "effective_from": after.effective_from,
            "status": after.status,
            "drafted_by": after.drafted_by,
            "draft_reason": after.draft_reason,
            "drafted_at": after.drafted_at,
            "approved_by": after.approved_by,
            "approve_reason": after.approve_reason,
            "approved_at": after.approved_at,
        }
        await conn.execute(
            pg_insert(policy_versions)
            .values(version=after.version, **values)
            .on_conflict_do_update(index_elements=[policy_versions.c.version], set_=values)
        )
    if isinstance(event, ev.PolicyPublished):
        # Approved versions, what quotes and verifications use: the document as published.
        await conn.execute(
            insert(policies).values(
                version=event.version,
                document=policy_json(policy_of(event)),
                effective_from=event.effective_from.ToDatetime(tzinfo=UTC),
            )
        )


async def _save_switches(conn: AsyncConnection, before: Switches, after: Switches) -> None:
    def rows(s: Switches) -> dict[str, Pause]:
        scoped = {category_scope(c): p for c, p in s.categories.items()}
        return scoped | ({CAMPAIGN_SCOPE: s.campaign} if s.campaign is not None else {})

    old, new = rows(before), rows(after)
    lifted = [scope for scope in old if scope not in new]
    if lifted:
        await conn.execute(delete(switches).where(switches.c.scope.in_(lifted)))
    for scope, pause in new.items():
        if scope not in old:
            await conn.execute(
                insert(switches).values(
                    scope=scope, reason=pause.reason, actor_id=pause.actor_id, since=pause.since
                )
            )


async def _save_merchant(conn: AsyncConnection, merchant: Merchant) -> None:
    values = vars(merchant)
    await conn.execute(
        pg_insert(merchants)
        .values(**values)
        .on_conflict_do_update(index_elements=[merchants.c.merchant_id], set_=values)
    )


async def project_registered(
    conn: AsyncConnection, registered: Sequence[tuple[Envelope, ev.ProductRegistered]]
) -> None:
    """Insert registered products and their first price, in two batched statements."""
    if not registered:
        return
    await conn.execute(
        insert(products), [vars(product_rules.evolve(None, e)) for _, e in registered]
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


# The three merges, compiled once (services.kernel.sql.Statement): the consumer of the ledger's
# events runs one per event. Each inserts the order's row or merges into it.
_RESERVED_DETAILS = (
    "sku",
    "merchant_id",
    "category",
    "platform_id",
    "serial",
    "unit_price_fen",
    "subsidy_fen",
    "policy_version",
    "reserved_at",
)
_reserved = pg_insert(sales_orders).values(
    order_id=bindparam("p_order_id"),
    status=domain.RESERVED,
    **{c: bindparam(f"p_{c}") for c in _RESERVED_DETAILS},
)
_MERGE_RESERVED = Statement(
    _reserved.on_conflict_do_update(
        index_elements=[sales_orders.c.order_id],
        set_={c: _reserved.excluded[c] for c in _RESERVED_DETAILS},
    ),
    name="merge SubsidyReserved",
)
_captured = pg_insert(sales_orders).values(
    order_id=bindparam("p_order_id"),
    status=domain.CAPTURED,
    captured=True,
    subsidy_fen=bindparam("p_subsidy_fen"),
    captured_at=bindparam("p_at"),
)
# Returns the order's serial (as the reservation recorded it, or '' if it has not arrived), for
# the one-unit-one-subsidy check, without a second read.
MERGE_CAPTURED = Statement(
    _captured.on_conflict_do_update(
        index_elements=[sales_orders.c.order_id],
        set_={
            "captured": True,
            "captured_at": _captured.excluded.captured_at,
            # never back from RELEASED
            "status": case(
                (sales_orders.c.status == domain.RELEASED, domain.RELEASED),
                else_=domain.CAPTURED,
            ),
        },
    ).returning(sales_orders.c.serial),
    name="merge SubsidyCaptured",
)
_released = pg_insert(sales_orders).values(
    order_id=bindparam("p_order_id"),
    status=domain.RELEASED,
    captured=bindparam("p_was_captured", type_=Boolean),
    refunded=bindparam("p_was_captured", type_=Boolean),
    release_reason=bindparam("p_reason"),
    released_at=bindparam("p_at"),
)
_MERGE_RELEASED = Statement(
    _released.on_conflict_do_update(
        index_elements=[sales_orders.c.order_id],
        set_={
            "status": domain.RELEASED,
            "captured": sales_orders.c.captured | _released.excluded.captured,
            "refunded": sales_orders.c.refunded | _released.excluded.refunded,
            "release_reason": _released.excluded.release_reason,
            "released_at": _released.excluded.released_at,
        },
    ),
    name="merge SubsidyReleased",
)


async def apply_ledger_event(conn: AsyncConnection, env: Envelope) -> str | None:
    """Merge one ledger event into its order's row; idempotent and order-independent. For a
    capture, returns the order's serial ('' if none is known yet); None otherwise."""
    event = payload_of(env)
    at = occurred(env)
    if isinstance(event, ev.SubsidyReserved):
        await _MERGE_RESERVED.run(
            conn,
            p_order_id=event.order_id,
            p_sku=event.sku,
            p_merchant_id=event.merchant_id,
            p_category=event.category,
            p_platform_id=event.platform_id,
            p_serial=event.serial,
            p_unit_price_fen=event.unit_price_fen,
            p_subsidy_fen=event.subsidy_fen,
            p_policy_version=env.policy_version,
            p_reserved_at=at,
        )
    elif isinstance(event, ev.SubsidyCaptured):
        serial: str = await MERGE_CAPTURED.scalar(
            conn, p_order_id=event.order_id, p_subsidy_fen=event.subsidy_fen, p_at=at
        )
        return serial
    elif isinstance(event, ev.SubsidyReleased):
        await _MERGE_RELEASED.run(
            conn,
            p_order_id=event.order_id,
            p_was_captured=event.was_captured,
            p_reason=event.reason,
            p_at=at,
        )
    return None
