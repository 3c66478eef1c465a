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
from subsidyctl.demo import IN_REGION
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
    q_id = await p.claim(consumer, "phone")
    return consumer, sku, pool, q_id


def reserve_request(
    order: str, consumer: str, sku: str, pool: str, qid: str
) -> ledger_pb2.ReserveSubsidyRequest:
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
            qualification_id=qid,
            order_id=order,
            category="phone",
            consumer_id=consumer,
            platform_id="jd",
        )
    )
    assert await qualification_status(p, qid) == ("LOCKED", order)

    # The sweeper (this call, or the ledger's own loop, whichever comes first) refuses it.
    await ledger_of(p).sweep_abandoned(older_than_s=60)

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


async def test_two_qualifications_racing_for_one_order_id_leave_no_lock_behind(
    platform: Platform, rng: random.Random
) -> None:
    """Two checkouts send the same order id with different consumers' qualifications: one is
    held; the other is refused, and its qualification is not left locked."""
    import asyncio

    p = platform
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    people = [await p.person(rng) for _ in range(2)]
    quals = [await p.claim(c, "phone") for _, c in people]
    order = f"same-{rng.randrange(10**12)}"

    async def reserve(i: int) -> str:
        try:
            await p.ledger.ReserveSubsidy(reserve_request(order, people[i][1], sku, pool, quals[i]))
            return "ok"
        except grpc.aio.AioRpcError as err:
            return status_of(err)[1]

    outcomes = sorted(await asyncio.gather(reserve(0), reserve(1)))
    assert outcomes[1] == "ok" and outcomes[0] in ("ORDER_HAS_QUALIFICATION", "ORDER_ID_REUSED")
    await p.quiesce()
    statuses = sorted([(await qualification_status(p, q))[0] for q in quals])
    assert statuses == ["AVAILABLE", "LOCKED"]


async def test_an_ambiguous_lock_failure_keeps_the_attempt_so_the_sweeper_can_undo_it(
    platform: Platform, rng: random.Random
) -> None:
    """Eligibility commits the lock but the answer is lost (a deadline, a dropped connection):
    the ledger must not forget the attempt, or the qualification stays locked for good."""
    from sqlalchemy import select

    p = platform
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"lost-{rng.randrange(10**12)}"
    ledger = ledger_of(p)
    real = ledger.eligibility

    class LockThenLoseTheAnswer:
        async def LockQualification(self, request: Any) -> Any:
            await real.LockQualification(request)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "deadline exceeded",
            )

    ledger.eligibility = LockThenLoseTheAnswer()  # type: ignore[assignment]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    finally:
        ledger.eligibility = real
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await qualification_status(p, qid) == ("LOCKED", order)
    store = p.running["ledger"].runtime.store
    async with store.engine.connect() as conn:
        kept = await conn.scalar(
            select(reservation_attempts.c.order_id).where(reservation_attempts.c.order_id == order)
        )
    assert kept == order
    await ledger.sweep_abandoned(older_than_s=-60)

    async def freed() -> None:
        assert await qualification_status(p, qid) == ("AVAILABLE", "")

    await eventually(freed)


async def test_a_refund_that_arrives_before_its_capture_is_judged_by_the_event(
    platform: Platform, rng: random.Random
) -> None:
    """Redelivery or a second eligibility replica can hand over a refund before the capture it
    follows. The qualification must end as the order's own policy says for a refund (here a
    version whose rule is "forfeit"), not merely unlocked, and the late capture changes nothing."""
    import json
    from datetime import datetime

    from services.eligibility.projections import policies
    from services.kernel.contract.policy import default_policy, policy_to_dict
    from services.kernel.events import Context, new_envelope, service_actor
    from subsidy.v1 import events_pb2 as ev

    p = platform
    consumer, _, _, qid = await setup(p, rng)
    order = f"refund-first-{rng.randrange(10**12)}"
    await p.eligibility.LockQualification(
        eligibility_pb2.LockQualificationRequest(
            qualification_id=qid,
            order_id=order,
            category="phone",
            consumer_id=consumer,
            platform_id="jd",
        )
    )
    store = p.running["eligibility"].runtime.store
    version = f"forfeit-{rng.randrange(10**9)}"
    document = policy_to_dict(default_policy()) | {"version": version, "refund_rule": "forfeit"}
    async with store.transaction() as tx:  # a version of the order's, never in force here
        await tx.conn.execute(
            policies.insert().values(
                version=version,
                document=json.dumps(document),
                effective_from=datetime(2099, 1, 1, tzinfo=UTC),
            )
        )
    e = p.running["eligibility"].wiring.registrations[0][1].e
    ctx = Context(service_actor("ledger"), policy_version=version)
    refund = ev.SubsidyReleased(
        order_id=order,
        pool_id="p",
        subsidy_fen=1,
        reason="REFUNDED",
        was_captured=True,
        qualification_id=qid,
    )
    capture = ev.SubsidyCaptured(order_id=order, pool_id="p", subsidy_fen=1, qualification_id=qid)
    for event in (refund, capture):
        async with store.transaction() as tx:
            await e.on_ledger_event(tx, new_envelope("ledger", "budget-pool/p", event, ctx))
    assert await qualification_status(p, qid) == ("FORFEITED", order)


async def test_a_forfeited_qualification_counts_against_the_personal_limit(
    platform: Platform, rng: random.Random
) -> None:
    """Under the "forfeit" refund rule a refunded qualification is used up: claiming again in
    that category must be refused, or forfeiting would be more generous than restoring."""
    from sqlalchemy import update

    from services.eligibility.projections import qualifications

    p = platform
    consumer, _, _, qid = await setup(p, rng)
    store = p.running["eligibility"].runtime.store
    row = qualifications.c.qualification_id == qid
    async with store.transaction() as tx:  # the state a forfeit-rule refund leaves behind
        await tx.conn.execute(
            update(qualifications).where(row).values(status="FORFEITED", order_id=f"gone-{qid}")
        )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.eligibility.ClaimQualification(
                eligibility_pb2.ClaimQualificationRequest(
                    circumstances=IN_REGION, consumer_id=consumer, category="phone", channel="jd"
                )
            )
        assert status_of(err.value) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PERSON_LIMIT_REACHED",
            "category",
        )
        await p.running["eligibility"].wiring.registrations[0][1].e.check_limits()
    finally:
        # The row was written by hand, not by an event: put it back as the events made it,
        # so that later tests on this platform (the replay tests) see consistent read models.
        async with store.transaction() as tx:
            await tx.conn.execute(
                update(qualifications).where(row).values(status="AVAILABLE", order_id="")
            )
