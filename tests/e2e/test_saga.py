"""An order is either held or refused, never both; nothing stays locked when the ledger dies."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from services.ledger.handlers import Ledger
from services.ledger.projections import reservation_attempts
from subsidy.v1 import eligibility_pb2, ledger_pb2
from tests.e2e.conftest import Platform, eventually, status_of


def ledger_of(p: Platform) -> Ledger:
    ledger: Ledger = p.running["ledger"].wiring.registrations[0][1].ledger
    return ledger


async def qualification_status(p: Platform, qid: str) -> tuple[str, str]:
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    )
    return q.status, q.order_id


async def setup(p: Platform, rng: random.Random) -> tuple[str, str, str, str]:
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    q = await p.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            consumer_id=consumer, category="phone", channel="jd"
        )
    )
    return consumer, sku, pool, q.qualification_id


def reserve_request(order: str, consumer: str, sku: str, pool: str, qid: str) -> Any:
    return ledger_pb2.ReserveSubsidyRequest(
        order_id=order,
        platform_id="jd",
        pool_id=pool,
        consumer_id=consumer,
        qualification_id=qid,
        sku=sku,
        unit_price_fen=300_000,
    )


async def test_an_attempt_abandoned_by_a_crash_is_refused_and_its_lock_undone(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"crash-{rng.randrange(10**12)}"
    # What the ledger had done when it died: the attempt recorded, the qualification locked.
    store = p.running["ledger"].runtime.store
    async with store.transaction() as tx:
        await tx.conn.execute(
            reservation_attempts.insert().values(
                order_id=order,
                pool_id=pool,
                qualification_id=qid,
                started_at=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
    await p.eligibility.LockQualification(
        eligibility_pb2.LockQualificationRequest(
            qualification_id=qid, order_id=order, category="phone", consumer_id=consumer
        )
    )
    assert await qualification_status(p, qid) == ("LOCKED", order)

    assert await ledger_of(p).sweep_abandoned(older_than_s=60) >= 1

    async def freed() -> None:
        assert await qualification_status(p, qid) == ("AVAILABLE", "")

    await eventually(freed)
    # The refused order stays refused (a late retry must not hold budget on a freed lock) ...
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    assert status_of(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_REFUSED",
        "order_id",
    )
    assert await qualification_status(p, qid) == ("AVAILABLE", "")
    # ... and the consumer checks out again with a new order id.
    res = await p.ledger.ReserveSubsidy(reserve_request(f"{order}-2", consumer, sku, pool, qid))
    assert res.subsidy_fen == 45_000


async def test_a_refusal_that_lands_while_an_attempt_is_locking_wins(
    platform: Platform, rng: random.Random
) -> None:
    """The sweeper (or a concurrent attempt of the order) refuses the order between this
    attempt's lock and its hold: the hold must not happen, and the lock must be undone."""
    p = platform
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"late-{rng.randrange(10**12)}"
    ledger = ledger_of(p)
    real = ledger.eligibility

    class LockThenRefused:
        async def LockQualification(self, request: Any) -> Any:
            locked = await real.LockQualification(request)
            await ledger.sweep_abandoned(older_than_s=-60)  # every attempt counts as abandoned
            return locked

    ledger.eligibility = LockThenRefused()  # type: ignore[assignment]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    finally:
        ledger.eligibility = real
    assert status_of(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_REFUSED",
        "order_id",
    )
    budget = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert (budget.available_fen, budget.reserved_fen) == (1_000_000, 0)

    async def freed() -> None:
        assert await qualification_status(p, qid) == ("AVAILABLE", "")

    await eventually(freed)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_held_order_is_never_refused_by_the_sweeper(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"held-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    store = p.running["ledger"].runtime.store
    async with store.transaction() as tx:  # a leftover attempt row for a held order
        await tx.conn.execute(
            reservation_attempts.insert().values(
                order_id=order,
                pool_id=pool,
                qualification_id=qid,
                started_at=datetime.now(UTC) - timedelta(minutes=5),
            )
        )
    await ledger_of(p).sweep_abandoned(older_than_s=60)
    await p.quiesce()
    assert await qualification_status(p, qid) == ("LOCKED", order)
    res = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    assert res.status == "PENDING"
