"""The claim rules on the real stack, over gRPC: the daily window, the campaign region, the day's
quota, the per-person limit, expiry by the sweeper and the re-claim limit.

The session's policy opens claims all day (so the rest of the suite runs at any hour); the
window, quota and re-claim tests decide under a version of the rules of their own, received by
eligibility as catalog's versions are and in force only from 2090, at instants the test picks
with eligibility's injected clock (each test on a day of its own, so the day's quota is its own).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from sqlalchemy import func, select

from services.eligibility.handlers import Eligibility
from services.eligibility.projections import policies, qualifications
from services.kernel.contract.policy import default_policy, policy_json, policy_to_dict
from services.kernel.contract.policy_document import policy_from_dict
from subsidy.v1 import common_pb2, eligibility_pb2
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import Platform, status_of

SHENZHEN = ZoneInfo("Asia/Shanghai")
FAILED = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def eligibility(platform: Platform) -> Iterator[Eligibility]:
    e: Eligibility = platform.running["eligibility"].wiring.registrations[0][1].e
    real = e.clock
    yield e
    e.clock = real


async def rules_from(
    p: Platform, rng: random.Random, day: datetime, **changes: Any
) -> dict[str, Any]:
    """A policy version in force from ``day`` (Shenzhen's rules, window 10:00-23:00, with
    ``changes``), received by eligibility as a published version is."""
    document = policy_to_dict(default_policy()) | {
        "version": f"claim-rules-{rng.randrange(10**9)}",
        "effective_from": day.isoformat(),
        **changes,
    }
    policy = policy_from_dict(document)
    store = p.running["eligibility"].runtime.store
    async with store.transaction() as tx:
        await tx.conn.execute(
            policies.insert().values(
                version=policy.version, document=policy_json(policy), effective_from=day
            )
        )
    # Known at once, as a published version is (its consumer adds it to the copy): the copy's
    # look-up of the table may have run within its refresh_s before this insert.
    e: Eligibility = p.running["eligibility"].wiring.registrations[0][1].e
    await e.policies.version(policy.version)
    return document


def at(instant: datetime) -> Callable[[], datetime]:
    """A clock stopped at ``instant``."""
    return lambda: instant.astimezone(UTC)


def a_day(rng: random.Random) -> datetime:
    """Midnight in Shenzhen on a day of 2090-2099 no other test uses."""
    return datetime(2090, 1, 1, tzinfo=SHENZHEN) + timedelta(days=rng.randrange(3000))


def claim(consumer: str, category: str = "phone", **kw: Any) -> Any:
    values: dict[str, Any] = {
        "consumer_id": consumer,
        "category": category,
        "channel": "jd",
        "circumstances": IN_REGION,
    }
    return eligibility_pb2.ClaimQualificationRequest(**(values | kw))


async def refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return status_of(err.value)


async def qualifications_of(p: Platform, consumer: str) -> int:
    store = p.running["eligibility"].runtime.store
    async with store.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).where(qualifications.c.consumer_id == consumer)
        )
    return int(count or 0)


async def test_claims_outside_the_daily_window_are_refused_and_change_nothing(
    platform: Platform, eligibility: Eligibility, rng: random.Random
) -> None:
    p = platform
    day = a_day(rng)
    await rules_from(p, rng, day)
    _, consumer = await p.person(rng)
    for early_or_late in (day + timedelta(hours=9, minutes=59), day + timedelta(hours=23)):
        eligibility.clock = at(early_or_late)
        assert await refused(p.eligibility.ClaimQualification(claim(consumer))) == (
            FAILED,
            "OUTSIDE_WINDOW",
            "",
        )
    assert await qualifications_of(p, consumer) == 0
    eligibility.clock = lambda: (day + timedelta(hours=10)).astimezone(UTC)  # 10:00 sharp
    q = await p.eligibility.ClaimQualification(claim(consumer))
    assert q.status == "AVAILABLE"


async def test_a_claim_from_outside_the_campaign_region_is_refused(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    beijing = common_pb2.Circumstances(region_code="110105")
    for outside in (beijing, common_pb2.Circumstances()):  # elsewhere, or not reported
        assert await refused(
            p.eligibility.ClaimQualification(claim(consumer, circumstances=outside))
        ) == (FAILED, "OUTSIDE_REGION", "circumstances.region_code")
    malformed = common_pb2.Circumstances(region_code="4403x0")
    assert await refused(
        p.eligibility.ClaimQualification(claim(consumer, circumstances=malformed))
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "REGION_CODE_FORMAT", "circumstances.region_code")
    assert await qualifications_of(p, consumer) == 0
    village = common_pb2.Circumstances(region_code="440310003012")  # inside Pingshan
    inside = await p.eligibility.ClaimQualification(claim(consumer, circumstances=village))
    assert inside.status == "AVAILABLE"


async def test_the_days_quota_is_exact_under_concurrent_claims(
    platform: Platform, eligibility: Eligibility, rng: random.Random
) -> None:
    p = platform
    day = a_day(rng)
    document = await rules_from(p, rng, day)
    for category in document["categories"]:
        if category["code"] == "tablet":
            category["daily_quota"] = 3
    await rules_from(p, rng, day + timedelta(seconds=1), categories=document["categories"])
    eligibility.clock = lambda: (day + timedelta(hours=12)).astimezone(UTC)
    consumers = [(await p.person(rng))[1] for _ in range(8)]
    results = await asyncio.gather(
        *(p.eligibility.ClaimQualification(claim(c, "tablet")) for c in consumers),
        return_exceptions=True,
    )
    issued = [r for r in results if isinstance(r, eligibility_pb2.Qualification)]
    refusals = [status_of(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(issued) == 3
    assert refusals == [(EXHAUSTED, "DAILY_QUOTA_EXHAUSTED", "category")] * 5
    # The next day in Shenzhen, the quota is fresh.
    eligibility.clock = lambda: (day + timedelta(days=1, hours=10)).astimezone(UTC)
    refused_one = next(c for c, r in zip(consumers, results, strict=True) if r not in issued)
    fresh = await p.eligibility.ClaimQualification(claim(refused_one, "tablet"))
    assert fresh.status == "AVAILABLE"
    await eligibility.check_limits()


async def test_a_second_phone_for_the_same_person_is_refused(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    await p.claim(consumer, "phone")
    assert await refused(p.eligibility.ClaimQualification(claim(consumer))) == (
        EXHAUSTED,
        "PERSON_LIMIT_REACHED",
        "category",
    )


async def test_the_sweeper_expires_qualifications_and_re_claims_are_limited(
    platform: Platform, eligibility: Eligibility, rng: random.Random
) -> None:
    p = platform
    day = a_day(rng)
    await rules_from(p, rng, day, reclaim_limit=1, qualification_validity_days=1)
    _, consumer = await p.person(rng)
    noon = day + timedelta(hours=12)
    eligibility.clock = lambda: noon.astimezone(UTC)
    first = await p.eligibility.ClaimQualification(claim(consumer))
    # The background sweeper, at the instant the qualification expires.
    expiry = first.expires_at.ToDatetime(tzinfo=UTC)
    eligibility.clock = lambda: expiry
    eligibility.sweep_every_s = 0.05
    stop = asyncio.Event()
    sweeper = asyncio.create_task(eligibility.expiry_loop(stop))
    try:
        for _ in range(200):
            got = await p.eligibility.GetQualification(
                eligibility_pb2.GetQualificationRequest(qualification_id=first.qualification_id)
            )
            if got.status == "EXPIRED":
                break
            await asyncio.sleep(0.05)
        assert got.status == "EXPIRED"
    finally:
        stop.set()
        await sweeper
        eligibility.sweep_every_s = 3600
    # The first re-claim is allowed (the limit is 1); it expires too; a second is refused.
    eligibility.clock = lambda: (noon + timedelta(days=1)).astimezone(UTC)
    second = await p.eligibility.ClaimQualification(claim(consumer))
    assert second.status == "AVAILABLE"
    eligibility.clock = lambda: second.expires_at.ToDatetime(tzinfo=UTC)
    assert await eligibility.expire_due() >= 1
    assert await eligibility.expire_due() == 0  # nothing left due: a sweep is idempotent
    eligibility.clock = lambda: (noon + timedelta(days=2)).astimezone(UTC)
    assert await refused(p.eligibility.ClaimQualification(claim(consumer))) == (
        EXHAUSTED,
        "RECLAIM_LIMIT_REACHED",
        "category",
    )
    assert await qualifications_of(p, consumer) == 2
