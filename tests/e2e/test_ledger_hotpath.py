"""The ledger's checkout hot path writes what the replay writes, on the real stack.

Reserve and capture project their events with what their decision already read under the
pool's lock (services.ledger.projections.Seen) and answer with the reservation's row as the
projection wrote it; the replay (``projections.rebuild``) reads everything again. Orders on a
pool split into shards and on a pool of one shard, paid, cancelled, refunded and left pending,
must leave exactly the rows the replay rebuilds, shards and the discount bill's captures
included, and every answer must be the reservation as GetReservation reads it afterwards.
"""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import text

from services.ledger import domain as ledger_domain
from services.ledger import projections as ledger_projections
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import TEST_PLATFORMS, Platform
from tests.e2e.test_replay import rows

SUBSIDY = 75_000  # 15% of a 5,000 yuan grade-2 washing machine
PRICE = 500_000
# Every read model a reserve or capture writes (test_replay compares the others).
HOT_READ_MODELS = (
    "budget_pools",
    "budget_sources",
    "budget_shards",
    "budget_categories",
    "budget_alerts",
    "reservations",
    "bill_captures",
)
OUTCOMES = ("paid", "cancelled", "refunded", "pending", "paid", "paid")
SHARDS = 3


def order_on(rng: random.Random, shard: int) -> str:
    """A random order id whose hash routes it to ``shard`` of a pool of SHARDS, so the
    sharded pool's orders reach every shard whatever the seed."""
    while True:
        order = f"hot-{rng.randrange(10**12)}"
        if ledger_domain.shard_of(order, SHARDS) == shard:
            return order


async def test_checkouts_write_the_rows_the_replay_rebuilds(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    sku = await p.product(rng, "washing_machine", 2, PRICE)
    sharded = f"pool-{rng.randrange(10**9)}"
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=sharded,
            amount_fen=20 * SUBSIDY,
            source="district",
            platform_ids=TEST_PLATFORMS,
            shards=SHARDS,
        )
    )
    single = await p.pool(rng, 20 * SUBSIDY)
    people = await asyncio.gather(*(p.person(rng) for _ in range(2 * len(OUTCOMES))))
    quals = [await p.claim(consumer, "washing_machine") for _, consumer in people]
    answers: dict[str, ledger_pb2.Reservation] = {}
    for i, outcome in enumerate(OUTCOMES * 2):
        order = order_on(rng, i % SHARDS)
        held = await p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id="jd",
                pool_id=sharded if i < len(OUTCOMES) else single,
                consumer_id=people[i][1],
                qualification_id=quals[i],
                sku=sku,
                unit_price_fen=PRICE,
            )
        )
        assert (held.status, held.subsidy_fen) == ("PENDING", SUBSIDY)
        answers[order] = held
        if outcome in ("paid", "refunded"):
            paid = await p.ledger.CaptureSubsidy(
                ledger_pb2.CaptureSubsidyRequest(
                    order_id=order, payment_ref=f"pay-{i}", paid_amount_fen=PRICE - SUBSIDY
                )
            )
            assert (paid.status, paid.payment_ref) == ("CAPTURED", f"pay-{i}")
            answers[order] = paid
        if outcome in ("cancelled", "refunded"):
            reason = "CANCELLED" if outcome == "cancelled" else "REFUNDED"
            released = await p.ledger.ReleaseSubsidy(
                ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason=reason)
            )
            assert (released.status, released.release_reason) == ("RELEASED", reason)
            answers[order] = released
    # Each answer is the reservation's row as it stands.
    for order, given in answers.items():
        read = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
        assert read == given, order  # every field, sources and paid amount too
    store = p.running["ledger"].runtime.store
    async with store.engine.connect() as conn:
        spread = (
            await conn.scalar(
                text("SELECT count(DISTINCT shard) FROM reservations WHERE pool_id = :p"),
                {"p": sharded},
            )
        ) or 0
    assert spread == SHARDS  # each order was held by the shard its id routes to
    await p.quiesce()
    before = await rows(store, HOT_READ_MODELS)
    # Every table has rows (the thresholds reached only when an earlier test's pool reached one).
    assert all(found for t, found in before.items() if t != "budget_alerts"), before.keys()
    async with store.transaction() as tx:  # damage them: the replay must not need them
        await tx.conn.execute(text("DELETE FROM bill_captures"))
        await tx.conn.execute(text("UPDATE budget_shards SET available_fen = available_fen + 1"))
        await tx.conn.execute(text("UPDATE budget_categories SET spent_fen = spent_fen + 1"))
    await ledger_projections.rebuild(store)
    assert await rows(store, HOT_READ_MODELS) == before
