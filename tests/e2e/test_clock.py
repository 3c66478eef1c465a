"""The clock is injected: expiry decided at an instant the test chooses, on the real stack.

Eligibility and the ledger take "now" from their ``clock``; the platform's checkout below runs
through gRPC, PostgreSQL and NATS as always, only the instant is the test's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.eligibility.handlers import Eligibility
from subsidy.v1 import eligibility_pb2, ledger_pb2
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_saga import reserve_request


@pytest.fixture
def eligibility(platform: Platform) -> Iterator[Eligibility]:
    e: Eligibility = platform.running["eligibility"].wiring.registrations[0][1].e
    real = e.clock
    yield e
    e.clock = real


async def test_a_qualification_past_its_validity_is_refused_at_checkout_as_expired(
    platform: Platform, eligibility: Eligibility, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    qid = await p.claim(consumer, "phone")
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    )
    expires = q.expires_at.ToDatetime(tzinfo=UTC)
    budget_before = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))

    def reserve(order: str) -> ledger_pb2.ReserveSubsidyRequest:
        return reserve_request(order, consumer, sku, pool, qid)

    eligibility.clock = lambda: expires  # the very instant it expires
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.ReserveSubsidy(reserve(f"late-{rng.randrange(10**12)}"))
    assert status_of(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "QUALIFICATION_EXPIRED",
        "qualification_id",
    )
    after = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert after == budget_before  # a refusal changes nothing
    still = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    )
    assert (still.status, still.order_id) == ("AVAILABLE", "")

    eligibility.clock = lambda: expires - timedelta(seconds=1)  # one second earlier: still valid
    held = await p.ledger.ReserveSubsidy(reserve(f"ontime-{rng.randrange(10**12)}"))
    assert held.status == "PENDING"


async def test_an_expired_unused_qualification_no_longer_counts_against_the_limit(
    platform: Platform, eligibility: Eligibility, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    validity = timedelta(days=(await eligibility.policies.in_force()).qualification_validity_days)
    # Claimed so long ago that it expired a minute ago (the claim is decided at that instant).
    eligibility.clock = lambda: datetime.now(UTC) - validity - timedelta(minutes=1)
    first = await p.claim(consumer, "phone")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # then it was valid: one phone per person
        await p.claim(consumer, "phone")
    assert status_of(err.value)[1] == "PERSON_LIMIT_REACHED"
    eligibility.clock = lambda: datetime.now(UTC)
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=first)
    )
    assert (q.status, q.expires_at.ToDatetime(tzinfo=UTC) < datetime.now(UTC)) == (
        "AVAILABLE",
        True,
    )
    second = await p.claim(consumer, "phone")  # now: the expired one no longer counts
    assert second != first
    await eligibility.check_limits()
