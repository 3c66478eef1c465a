"""The security review's attacks, replayed on the real stack with real certificates: each fails.

The review (issue "Who is calling") found that one anonymous client could fund a pool, approve
its own policy, approve a merchant while claiming to be a platform, lock anyone's qualification,
act on another platform's orders, and read which identity factor failed. Each test below plays
one of them as the attacker would today, with the certificate the attacker could get, and checks
the refusal and that nothing changed.
"""

from __future__ import annotations

import random

import grpc
import pytest

from services.audit import log as audit_log
from services.kernel import rpc
from services.kernel.identity import Caller, Role
from subsidy.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    eligibility_pb2,
    eligibility_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)
from subsidy.v1 import events_pb2 as ev
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_saga import reserve_request, setup

DENIED = grpc.StatusCode.PERMISSION_DENIED
ROLE = (DENIED, "ROLE_NOT_ALLOWED", "")


def ledger_as(p: Platform, who: Caller) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
    channel = rpc.channel(f"127.0.0.1:{p.running['ledger'].port}", p.infra.identities(who))
    return ledger_pb2_grpc.LedgerServiceStub(channel)


def eligibility_as(p: Platform, who: Caller) -> eligibility_pb2_grpc.EligibilityServiceAsyncStub:
    channel = rpc.channel(f"127.0.0.1:{p.running['eligibility'].port}", p.infra.identities(who))
    return eligibility_pb2_grpc.EligibilityServiceStub(channel)


async def refused(call: object) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return status_of(err.value)


async def test_nobody_funds_a_pool_alone(platform: Platform, rng: random.Random) -> None:
    p = platform
    pool = f"pool-{rng.randrange(10**9)}"
    request = ledger_pb2.ProposeFundingRequest(pool_id=pool, amount_fen=10**8, source="district")
    # A platform cannot even propose; an operator proposes but cannot approve.
    platform_ledger = ledger_as(p, Caller(Role.PLATFORM, "jd"))
    assert await refused(platform_ledger.ProposeFunding(request)) == ROLE
    operator = ledger_as(p, Caller(Role.OPERATOR, "li"))
    proposal = await operator.ProposeFunding(request)
    assert (proposal.status, proposal.proposed_by) == ("PROPOSED", "li")
    approve = ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="ok")
    assert await refused(operator.ApproveFunding(approve)) == ROLE
    # The same person with an approver certificate is still the proposer: maker-checker.
    same_person = ledger_as(p, Caller(Role.APPROVER, "li"))
    assert await refused(same_person.ApproveFunding(approve)) == (
        DENIED,
        "MAKER_CHECKER",
        "proposal_id",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await operator.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert status_of(err.value)[1] == "UNKNOWN_POOL"  # still nothing in the pool
    wang = ledger_as(p, Caller(Role.APPROVER, "wang"))
    approved = await wang.ApproveFunding(approve)
    assert (approved.status, approved.approved_by, approved.pool.funded_fen) == (
        "APPROVED",
        "wang",
        10**8,
    )
    zhou = ledger_as(p, Caller(Role.APPROVER, "zhou"))
    again = await zhou.ApproveFunding(approve)
    assert again.pool.funded_fen == 10**8  # approving twice funds once


async def test_funding_above_the_ceiling_is_refused(platform: Platform, rng: random.Random) -> None:
    p = platform
    ceiling = p.running["ledger"].runtime.settings.funding_ceiling_fen
    operator = ledger_as(p, Caller(Role.OPERATOR, "li"))
    request = ledger_pb2.ProposeFundingRequest(
        pool_id=f"pool-{rng.randrange(10**9)}", amount_fen=ceiling + 1, source="district"
    )
    assert await refused(operator.ProposeFunding(request)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FUNDING_CEILING",
        "amount_fen",
    )


async def test_a_platform_cannot_approve_a_merchant_or_a_policy(platform: Platform) -> None:
    p = platform
    catalog = rpc.channel(
        f"127.0.0.1:{p.running['catalog'].port}", p.infra.identities(Caller(Role.PLATFORM, "jd"))
    )
    stub = catalog_pb2_grpc.CatalogServiceStub(catalog)
    review = catalog_pb2.ReviewMerchantRequest(merchant_id="m-any", approve=True, reason="mine")
    assert await refused(stub.ReviewMerchant(review)) == ROLE
    approve = catalog_pb2.ApprovePolicyRequest(version="any", reason="mine")
    assert await refused(stub.ApprovePolicy(approve)) == ROLE
    draft = catalog_pb2.DraftPolicyRequest(document="version: x", reason="mine")
    assert await refused(stub.DraftPolicy(draft)) == ROLE


async def test_a_platform_cannot_lock_a_qualification(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    consumer, _, _, qid = await setup(p, rng)
    lock = eligibility_pb2.LockQualificationRequest(
        qualification_id=qid,
        order_id="made-up",
        category="phone",
        consumer_id=consumer,
        platform_id="jd",
    )
    as_platform = eligibility_as(p, Caller(Role.PLATFORM, "jd"))
    assert await refused(as_platform.LockQualification(lock)) == ROLE
    # Another service cannot either: only the ledger locks, at checkout.
    audit = eligibility_as(p, Caller(Role.SERVICE, "audit"))
    assert await refused(audit.LockQualification(lock)) == ROLE
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    )
    assert (q.status, q.order_id) == ("AVAILABLE", "")


async def test_platform_a_cannot_touch_platform_bs_order(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    consumer, sku, pool, qid = await setup(p, rng)  # claimed and reserved through "jd"
    order = f"b-{rng.randrange(10**12)}"
    held = await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    other = ledger_as(p, Caller(Role.PLATFORM, "taobao"))
    unknown = (grpc.StatusCode.NOT_FOUND, "UNKNOWN_ORDER", "order_id")
    assert (
        await refused(other.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order)))
        == unknown
    )
    release = ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="CANCELLED")
    assert await refused(other.ReleaseSubsidy(release)) == unknown
    get = ledger_pb2.GetReservationRequest(order_id=order)
    assert await refused(other.GetReservation(get)) == unknown
    # ... exactly what an order that never existed answers, so ids cannot be probed.
    never = ledger_pb2.GetReservationRequest(order_id=f"never-{rng.randrange(10**12)}")
    assert await refused(other.GetReservation(never)) == unknown
    # Nor can it reserve in another platform's name, or read or use its qualifications.
    as_jd = reserve_request(f"x-{rng.randrange(10**12)}", consumer, sku, pool, qid)
    assert await refused(other.ReserveSubsidy(as_jd)) == (
        DENIED,
        "NOT_YOUR_PLATFORM",
        "platform_id",
    )
    taobao = eligibility_as(p, Caller(Role.PLATFORM, "taobao"))
    get_q = eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    assert await refused(taobao.GetQualification(get_q)) == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_QUALIFICATION",
        "qualification_id",
    )
    claim = eligibility_pb2.ClaimQualificationRequest(
        circumstances=IN_REGION, consumer_id=consumer, category="air_conditioner", channel="taobao"
    )
    assert await refused(taobao.ClaimQualification(claim)) == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_CONSUMER",
        "consumer_id",
    )
    still = await p.ledger.GetReservation(get)
    assert (still.status, still.subsidy_fen) == ("PENDING", held.subsidy_fen)


async def test_registration_does_not_say_which_factor_failed(
    platform: Platform, rng: random.Random
) -> None:
    """The review recovered a full phone number from its mask by trying the hidden digits and
    reading which factor the authority rejected. Every mismatch now reads the same, the precise
    reason is only in the operator's event, and an ID number gets a few tries a day."""
    p = platform
    person, _ = await p.person(rng)
    wrong_phone = person.phone[:-1] + str((int(person.phone[-1]) + 1) % 10)
    attempts = [
        dict(phone=wrong_phone),
        dict(name=person.name + "某"),
        dict(phone=wrong_phone, name=person.name + "某"),
    ]
    answers = set()
    for changed in attempts:
        request = eligibility_pb2.RegisterConsumerRequest(
            name=changed.get("name", person.name),
            id_number=person.id_number,
            phone=changed.get("phone", person.phone),
            platform_id="jd",
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.eligibility.RegisterConsumer(request)
        info = rpc.error_info(err.value)
        assert info is not None
        answers.add(
            (err.value.code(), err.value.details(), info.reason, tuple(info.metadata.items()))
        )
    assert answers == {
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "the identity authority did not confirm name, ID number and phone",
            "IDENTITY_MISMATCH",
            (),
        )
    }
    store = p.running["eligibility"].runtime.store
    failed = [
        r.envelope
        for r in await store.read_all(limit=10**6)
        if r.envelope.event_type == "subsidy.v1.IdentityCheckFailed"
    ]
    reasons = [ev.IdentityCheckFailed.FromString(e.payload).authority_reason for e in failed[-3:]]
    assert reasons == ["PHONE_MISMATCH", "NAME_MISMATCH", "NAME_MISMATCH"]  # for operators only
    limit = p.running["eligibility"].runtime.settings.identity_attempts_per_day
    for _ in range(limit - len(attempts)):
        with pytest.raises(grpc.aio.AioRpcError):
            await p.eligibility.RegisterConsumer(
                eligibility_pb2.RegisterConsumerRequest(
                    name=person.name,
                    id_number=person.id_number,
                    phone=wrong_phone,
                    platform_id="jd",
                )
            )
    # Now even the right three factors are refused for that ID number until tomorrow.
    right = eligibility_pb2.RegisterConsumerRequest(
        name=person.name, id_number=person.id_number, phone=person.phone, platform_id="jd"
    )
    assert await refused(p.eligibility.RegisterConsumer(right)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "IDENTITY_ATTEMPTS_EXCEEDED",
        "id_number",
    )


async def test_the_outbox_wedge_request_records_nothing_large_and_checkouts_flow_on(
    platform: Platform, rng: random.Random
) -> None:
    """The review wedged the ledger's outbox with one request carrying a 1.5 MB
    ``actor.reason``: the event committed and NATS refused it for ever. The request's actor is
    now ignored (who acts is the certificate's) and every event is bounded at append, so the
    same request records a normal event, and a checkout after it reaches the audit log."""
    p = platform
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"wedge-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))
    huge = common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd", reason="r" * 1_500_000)
    released = await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="CANCELLED", actor=huge)
    )
    assert released.status == "RELEASED"
    store = p.running["ledger"].runtime.store
    [last] = (await store.read_all(limit=10**6))[-1:]
    assert last.envelope.event_type == "subsidy.v1.SubsidyReleased"
    assert last.envelope.ByteSize() < 10_000 and last.envelope.actor.reason == ""
    # A checkout after it flows to the audit log within seconds.
    consumer2, sku2, pool2, qid2 = await setup(p, rng)
    order2 = f"after-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(reserve_request(order2, consumer2, sku2, pool2, qid2))
    await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order2))
    await p.quiesce(within=10)  # every consumer, the audit log's included, has every event
    size, _, _ = await audit_log.info(p.running["audit"].runtime.store)
    assert size == sum([await r.runtime.store.count() for r in p.running.values()])


async def test_a_platform_reaches_only_the_pools_assigned_to_it(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = f"jd-only-{rng.randrange(10**9)}"
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool, amount_fen=1_000_000, source="district", platform_ids=["jd"]
        )
    )
    jd, taobao = (
        ledger_as(p, Caller(Role.PLATFORM, "jd")),
        ledger_as(p, Caller(Role.PLATFORM, "taobao")),
    )
    assert (await jd.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))).funded_fen == 1_000_000
    unknown = (grpc.StatusCode.NOT_FOUND, "UNKNOWN_POOL", "pool_id")
    assert await refused(taobao.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))) == unknown
    reserve = ledger_pb2.ReserveSubsidyRequest(
        order_id=f"o-{rng.randrange(10**12)}",
        platform_id="taobao",
        pool_id=pool,
        consumer_id="c-any",
        qualification_id="q-any",
        sku="sku-any",
        unit_price_fen=300_000,
    )
    assert await refused(taobao.ReserveSubsidy(reserve)) == unknown
    # Exactly what a pool that does not exist answers.
    never = ledger_pb2.GetBudgetRequest(pool_id=f"never-{rng.randrange(10**9)}")
    assert await refused(taobao.GetBudget(never)) == unknown
    operator = ledger_as(p, Caller(Role.OPERATOR, "li"))  # people see every pool
    assert (await operator.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))).funded_fen
