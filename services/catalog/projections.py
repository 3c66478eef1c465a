"""Catalog read models fed by events: policies, merchants, products."""

from __future__ import annotations

import json
from datetime import UTC

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Envelope, payload_of
from subsidy.v1 import events_pb2 as ev

metadata = MetaData()

policies = Table(
    "policies",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
)
merchants = Table(
    "merchants",
    metadata,
    Column("merchant_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("licence_number", String(32), nullable=False),
    Column("contact_masked", String(32), nullable=False),
    Column("status", String(16), nullable=False),
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


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    event = payload_of(env)
    if isinstance(event, ev.PolicyPublished):
        json.loads(event.policy_json)  # a stored policy is always valid JSON
        await conn.execute(
            insert(policies).values(
                version=event.version,
                document=event.policy_json,
                effective_from=event.effective_from.ToDatetime(tzinfo=UTC),
            )
        )
    elif isinstance(event, ev.MerchantApplied):
        await conn.execute(
            insert(merchants).values(
                merchant_id=event.merchant_id,
                name=event.name,
                licence_number=event.licence_number,
                contact_masked=event.contact_masked,
                status="APPLIED",
            )
        )
    elif isinstance(event, ev.MerchantReviewed):
        await conn.execute(
            update(merchants)
            .where(merchants.c.merchant_id == event.merchant_id)
            .values(status="APPROVED" if event.approved else "REJECTED")
        )
    elif isinstance(event, ev.ProductRegistered):
        await conn.execute(
            insert(products).values(
                sku=event.sku,
                merchant_id=event.merchant_id,
                category=event.category,
                grade=event.grade,
                brand=event.brand,
                model=event.model,
                energy_label_code=event.energy_label_code,
                list_price_fen=event.list_price_fen,
                status="LISTED",
            )
        )
