"""Read models rebuild from events alone: ledger and eligibility, on the real stack.

A history with every kind of event (funding with and without a key, reservations that are
paid, cancelled, refunded and refused, claims in several categories) is made first; the read
models are then wiped and tampered with, rebuilt by replaying the event store, and compared
row by row with what the services had built inline.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from services.eligibility import projections as eligibility_projections
from services.kernel.eventstore import EventStore
from services.ledger import projections as ledger_projections
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import TEST_PLATFORMS, Platform

Rows = dict[str, list[tuple[Any, ...]]]
LEDGER_READ_MODELS = (
    "budget_pools",
    "budget_sources",
    "budget_categories",
    "budget_alerts",
    "budget_tranches",
    "reservations",
    "funding_keys",
    "funding_proposals",
)
ELIGIBILITY_READ_MODELS = ("consumers", "qualifications", "quota_usage")
# Same user: compared too, but this history need not link or erase anyone (test_same_user.py
# rebuilds after links and erasures).
ELIGIBILITY_PERSON_MODELS = (
    "consumer_identifiers",
    "persons",
    "person_members",
    "person_held_when_linked",
    "consumer_erasures",
)
ELIGIBILITY_KEPT = ("person_keys", "policies")  # not read models of eligibility's events


async def rows(store: EventStore, tables: tuple[str, ...]) -> Rows:
    """Every row of each table, ordered by its primary key (its first columns)."""
    async with store.engine.connect() as conn:
        return {
            t: [tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
            for t in tables
        }


async def unordered_rows(store: EventStore, tables: tuple[str, ...]) -> Rows:
    """Every row of each table, sorted whole (rows of these tables may share their first
    columns, so an ORDER BY on them would leave ties in any order)."""
    return {t: sorted(found) for t, found in (await rows(store, tables)).items()}


async def distinct(store: EventStore, column: str, table: str) -> set[Any]:
    async with store.engine.connect() as conn:
        return set((await conn.execute(text(f"SELECT DISTINCT {column} FROM {table}"))).scalars())


async def make_history(p: Platform, rng: random.Random) -> None:
    pool = await p.pool(rng, 1_000_000)
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool,
            amount_fen=200_000,
            source="platform-matching",
            idempotency_key=f"k-{rng.randrange(10**12)}",
        )
    )
    # A funding in tranches (one due already, one next year): the schedule rebuilds too.
    scheduled = ledger_pb2.ProposeFundingRequest(
        pool_id=pool, amount_fen=300_000, source="district", platform_ids=TEST_PLATFORMS
    )
    for fen, at in ((100_000, dt.datetime(2025, 1, 1, tzinfo=dt.UTC)), (200_000, None)):
        tranche = scheduled.tranches.add(amount_fen=fen)
        tranche.releases_at.FromDatetime(at or dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    await p.fund(scheduled)
    tiny = await p.pool(rng, 10)
    watched = await p.pool(rng, 60_000)  # one paid phone spends 75 %: the 50 % alert
    phone = await p.product(rng, "phone", 0, 300_000)
    for outcome in ("paid", "cancelled", "refunded", "pending", "refused", "alerted"):
        _, consumer = await p.person(rng)
        claimed = {
            category: await p.eligibility.ClaimQualification(
                eligibility_pb2.ClaimQualificationRequest(
                    circumstances=IN_REGION, consumer_id=consumer, category=category, channel="jd"
                )
            )
            for category in ("phone", "refrigerator", "air_conditioner")
        }
        order = f"o-{rng.randrange(10**12)}"
        request = ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id={"refused": tiny, "alerted": watched}.get(outcome, pool),
            consumer_id=consumer,
            qualification_id=claimed["phone"].qualification_id,
            sku=phone,
            unit_price_fen=300_000,
        )
        if outcome == "refused":
            with pytest.raises(grpc.aio.AioRpcError):
                await p.ledger.ReserveSubsidy(request)
            continue
        await p.ledger.ReserveSubsidy(request)
        if outcome in ("paid", "refunded", "alerted"):
            await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
        if outcome == "cancelled":
            await p.ledger.ReleaseSubsidy(
                ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="CANCELLED")
            )
        if outcome == "refunded":
            await p.ledger.ReleaseSubsidy(
                ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
            )
    await p.quiesce()


async def test_ledger_read_models_rebuild_from_events_alone(
    platform: Platform, rng: random.Random
) -> None:
    await make_history(platform, rng)
    store = platform.running["ledger"].runtime.store
    before = await rows(store, LEDGER_READ_MODELS)
    assert all(before.values()), before.keys()
    assert {"PENDING", "CAPTURED", "RELEASED"} <= await distinct(store, "status", "reservations")
    async with store.transaction() as tx:  # damage them: the replay must not need them
        await tx.conn.execute(text("DELETE FROM reservations"))
        await tx.conn.execute(text("UPDATE budget_pools SET available_fen = available_fen + 1"))
        await tx.conn.execute(text("DELETE FROM funding_keys"))
    applied = await ledger_projections.rebuild(store)
    assert applied == await store.count()
    assert await rows(store, LEDGER_READ_MODELS) == before
    # Every pool the replay rebuilt answers what its rows say: a pool's row, plus its other
    # shards' rows when it is split (budget_shards holds shard 1 and up).
    async with store.engine.connect() as conn:
        pools = (
            await conn.execute(
                text(
                    "SELECT p.pool_id, p.funded_fen + COALESCE(sum(s.funded_fen), 0), "
                    "p.available_fen + COALESCE(sum(s.available_fen), 0), "
                    "p.reserved_fen + COALESCE(sum(s.reserved_fen), 0), "
                    "p.spent_fen + COALESCE(sum(s.spent_fen), 0) FROM budget_pools p "
                    "LEFT JOIN budget_shards s ON s.pool_id = p.pool_id GROUP BY p.pool_id"
                )
            )
        ).all()
    assert pools
    for pool_id, *figures in pools:
        b = await platform.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        assert [b.funded_fen, b.available_fen, b.reserved_fen, b.spent_fen] == figures, pool_id


async def test_eligibility_read_models_rebuild_from_events_alone(
    platform: Platform, rng: random.Random
) -> None:
    await make_history(platform, rng)
    store = platform.running["eligibility"].runtime.store
    before = await rows(store, ELIGIBILITY_READ_MODELS)
    persons_before = await unordered_rows(store, ELIGIBILITY_PERSON_MODELS)
    kept = await rows(store, ELIGIBILITY_KEPT)
    assert all(before.values()), before.keys()
    assert {"AVAILABLE", "LOCKED", "USED"} <= await distinct(store, "status", "qualifications")
    async with store.transaction() as tx:  # damage them: the replay must not need them
        await tx.conn.execute(text("DELETE FROM consumers"))
        await tx.conn.execute(text("UPDATE qualifications SET status = 'FORFEITED'"))
        await tx.conn.execute(text("UPDATE quota_usage SET issued = issued + 7"))
    applied = await eligibility_projections.rebuild(store)
    assert applied == await store.count()
    assert await rows(store, ELIGIBILITY_READ_MODELS) == before
    assert await unordered_rows(store, ELIGIBILITY_PERSON_MODELS) == persons_before
    assert await rows(store, ELIGIBILITY_KEPT) == kept
    async with store.engine.connect() as conn:
        some = (await conn.execute(text("SELECT * FROM qualifications LIMIT 1"))).one()
    got = await platform.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=some.qualification_id)
    )
    assert (got.status, got.order_id) == (some.status, some.order_id)
    await platform.running["eligibility"].wiring.registrations[0][1].e.check_limits()
