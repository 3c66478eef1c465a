"""Funding sources on the real stack: the session's demo policy declares two sources (district,
platform-matching) split pro rata, alert thresholds at 50 / 80 / 95 % spent, and a projector
sub-budget of 10 % of the pool (subsidyctl/demo.yaml).

Each test reads back what the ledger recorded (the reservation's parts, the events in the pool's
stream, GetBudget's per-source figures, /metrics, `subsidyctl budget status`) and checks that a
refusal changed nothing.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from services.kernel import rpc
from services.kernel.contract.budget import pool_stream
from services.kernel.events import payload_of
from services.kernel.identity import Caller, Role
from subsidy.v1 import eligibility_pb2, ledger_pb2, ledger_pb2_grpc
from subsidy.v1 import events_pb2 as ev
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import TEST_PLATFORMS, Platform, eventually, status_of

PHONE_PRICE = 300_000  # 15 %: a subsidy of 45,000 fen
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def checkout(p: Platform, pool: str, sku: str, category: str, price: int) -> tuple[str, str]:
    """A new person claims ``category`` and reserves ``sku`` from ``pool``: (order, qualification).
    Raises the call's error when the reservation is refused."""
    _, consumer = await p.person(random.Random())
    qualification = await p.claim(consumer, category)
    order = f"o-{random.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=qualification,
            sku=sku,
            unit_price_fen=price,
        )
    )
    return order, qualification


async def budget(p: Platform, pool: str) -> ledger_pb2.BudgetPool:
    return await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))


def by_source(b: ledger_pb2.BudgetPool) -> dict[str, tuple[int, int, int, int]]:
    """Each source's (funded, available, reserved, spent)."""
    return {
        s.source: (s.funded_fen, s.available_fen, s.reserved_fen, s.spent_fen) for s in b.sources
    }


async def pool_events(p: Platform, pool: str) -> list[object]:
    envelopes = await p.running["ledger"].runtime.store.read_stream(pool_stream(pool))
    return [payload_of(e) for e in envelopes]


async def ledger_events(p: Platform) -> int:
    return await p.running["ledger"].runtime.store.count()


def ledger_as(p: Platform, who: Caller) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
    channel = rpc.channel(f"127.0.0.1:{p.running['ledger'].port}", p.infra.identities(who))
    return ledger_pb2_grpc.LedgerServiceStub(channel)


async def test_a_two_source_pool_records_each_sources_part_and_a_refund_credits_them_back(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool, amount_fen=250_000, source="platform-matching", reason="matching"
        )
    )
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    order, _ = await checkout(p, pool, phone, "phone", PHONE_PRICE)
    held = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    # Pro rata by what each funded (4:1), in whole fen.
    assert [(s.source, s.fen) for s in held.sources] == [
        ("district", 36_000),
        ("platform-matching", 9_000),
    ]
    assert by_source(await budget(p, pool)) == {
        "district": (1_000_000, 964_000, 36_000, 0),
        "platform-matching": (250_000, 241_000, 9_000, 0),
    }
    await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="x"))
    paid = await budget(p, pool)
    assert (paid.funded_fen, paid.available_fen, paid.spent_fen) == (1_250_000, 1_205_000, 45_000)
    assert by_source(paid) == {
        "district": (1_000_000, 964_000, 0, 36_000),
        "platform-matching": (250_000, 241_000, 0, 9_000),
    }
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
    )
    assert by_source(await budget(p, pool)) == {
        "district": (1_000_000, 1_000_000, 0, 0),
        "platform-matching": (250_000, 250_000, 0, 0),
    }
    # The events say it, so the auditor's fold can rebuild it from them alone.
    moved = {
        type(e).__name__: [(s.source, s.fen) for s in e.sources]
        for e in await pool_events(p, pool)
        if isinstance(e, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased)
    }
    assert moved == {
        name: [("district", 36_000), ("platform-matching", 9_000)]
        for name in ("SubsidyReserved", "SubsidyCaptured", "SubsidyReleased")
    }
    for source, fen in (("district", 1_000_000), ("platform-matching", 250_000)):
        labels = {"pool": pool, "source": source, "bucket": "available"}
        assert REGISTRY.get_sample_value("subsidy_budget_source_fen", labels) == float(fen)


async def test_a_category_past_its_sub_budget_is_refused_and_a_cancel_gives_it_back(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)  # projectors: at most 10 %, 100,000 fen
    projector = await p.product(rng, "projector", 0, 400_000)  # 15 %: 60,000 fen
    first, _ = await checkout(p, pool, projector, "projector", 400_000)
    before = await ledger_events(p)
    _, consumer = await p.person(rng)
    qualification = await p.claim(consumer, "projector")
    request = ledger_pb2.ReserveSubsidyRequest(
        order_id=f"o-{rng.randrange(10**12)}",
        platform_id="jd",
        pool_id=pool,
        consumer_id=consumer,
        qualification_id=qualification,
        sku=projector,
        unit_price_fen=400_000,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.ReserveSubsidy(request)
    assert status_of(err.value) == (EXHAUSTED, "SUB_BUDGET_EXHAUSTED", "pool_id")
    info = rpc.error_info(err.value)
    assert info is not None and dict(info.metadata)["category"] == "projector"
    assert dict(info.metadata)["pool_id"] == pool
    # Refused before the qualification was locked: nothing was written, the consumer keeps it.
    assert await ledger_events(p) == before
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qualification)
    )
    assert q.status == "AVAILABLE"
    b = await budget(p, pool)
    [category] = [c for c in b.categories if c.category == "projector"]
    assert (category.reserved_fen, category.spent_fen, category.sub_budget_fen) == (
        60_000,
        0,
        100_000,
    )
    assert b.available_fen == 940_000  # the pool could pay: the sub-budget refused it
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=first, reason="CANCELLED")
    )
    again = await p.ledger.ReserveSubsidy(request)
    assert (again.status, again.subsidy_fen) == ("PENDING", 60_000)


async def test_a_threshold_raises_its_alert_once_in_events_metrics_and_budget_status(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    pool = await p.pool(rng, 100_000)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)

    async def paid() -> str:
        order, _ = await checkout(p, pool, phone, "phone", PHONE_PRICE)
        await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
        return order

    def alerts(events: list[object]) -> list[tuple[str, int, int]]:
        return [
            (e.category, e.threshold_bp, e.spent_fen)
            for e in events
            if isinstance(e, ev.BudgetThresholdReached)
        ]

    await paid()  # 45 % spent: no threshold yet
    assert alerts(await pool_events(p, pool)) == []
    second = await paid()  # 90 %: 50 % and 80 %, for the pool and for phones (no sub-budget)
    raised = [("", 5_000, 90_000), ("", 8_000, 90_000), ("phone", 5_000, 90_000)]
    raised.append(("phone", 8_000, 90_000))
    assert alerts(await pool_events(p, pool)) == raised
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=second, reason="REFUNDED")
    )
    await paid()  # back to 90 %: the same thresholds, never raised twice
    assert alerts(await pool_events(p, pool)) == raised
    labels = {"pool": pool, "category": "", "threshold_bp": "8000"}
    assert REGISTRY.get_sample_value("subsidy_budget_threshold_reached", labels) == 1.0
    labels = {"pool": pool, "category": "", "threshold_bp": "9500"}
    assert REGISTRY.get_sample_value("subsidy_budget_threshold_reached", labels) is None
    auditor = identity_dir(p.infra.identities(Caller(Role.AUDITOR, "audit")), tmp_path / "a")
    address = ("--ledger", f"127.0.0.1:{p.running['ledger'].port}")
    code, status, _ = await subsidyctl("budget", "status", pool, *address, identity=auditor)
    assert code == 0
    assert (status["spent_fen"], status["spent_bp"]) == (90_000, 9_000)
    assert [(a["category"], a["threshold_bp"]) for a in status["alerts"]] == [
        (c, t) for c, t, _ in raised
    ]
    assert status["policy"]["alert_thresholds_bp"] == [5_000, 8_000, 9_500]
    assert status["policy"]["split"] == "pro_rata"
    assert [s["source"] for s in status["sources"]] == ["district"]
    assert {c["category"]: c["sub_budget_fen"] for c in status["categories"]} == {
        "phone": None,
        "projector": 10_000,  # listed with its sub-budget even before any projector
    }


async def test_tranches_become_available_at_their_time_and_pro_rata_then_exhausts_a_source(
    platform: Platform, rng: random.Random
) -> None:
    """A source whose money arrives later takes no part until it has funded something; once
    its tranche is released, pro rata asks each source for half, and the district, which paid
    the first orders alone, cannot: SOURCE_EXHAUSTED, though the pool has money."""
    p = platform
    pool = await p.pool(rng, 100_000)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    scheduled = ledger_pb2.ProposeFundingRequest(
        pool_id=pool, amount_fen=100_000, source="platform-matching", reason="second half"
    )
    scheduled.tranches.add(amount_fen=100_000).releases_at.FromDatetime(soon)
    funded = await p.fund(scheduled)
    assert (funded.funded_fen, funded.scheduled_fen) == (100_000, 100_000)
    b = await budget(p, pool)
    assert [(t.source, t.amount_fen) for t in b.tranches] == [("platform-matching", 100_000)]
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    for _ in range(2):
        order, _ = await checkout(p, pool, phone, "phone", PHONE_PRICE)
        held = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
        assert [(s.source, s.fen) for s in held.sources] == [("district", 45_000)]

    async def released() -> ledger_pb2.BudgetPool:
        b = await budget(p, pool)
        assert (b.funded_fen, b.scheduled_fen, list(b.tranches)) == (200_000, 0, [])
        return b

    b = await eventually(released)  # the ledger's sweeper releases it (every second)
    assert by_source(b) == {
        "district": (100_000, 10_000, 90_000, 0),
        "platform-matching": (100_000, 100_000, 0, 0),
    }
    kinds = [type(e).__name__ for e in await pool_events(p, pool)]
    assert kinds.count("TrancheReleased") == 1
    before = await ledger_events(p)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await checkout(p, pool, phone, "phone", PHONE_PRICE)
    assert status_of(err.value) == (EXHAUSTED, "SOURCE_EXHAUSTED", "pool_id")
    info = rpc.error_info(err.value)
    assert info is not None and dict(info.metadata)["source"] == "district"
    assert await ledger_events(p) == before


async def test_funding_refusals_change_nothing(platform: Platform, rng: random.Random) -> None:
    p = platform
    pool = await p.pool(rng, 1_000)
    before, figures = await ledger_events(p), await budget(p, pool)

    def funding(**fields: object) -> ledger_pb2.ProposeFundingRequest:
        request = ledger_pb2.ProposeFundingRequest(
            pool_id=pool, amount_fen=5_000, source="district", platform_ids=TEST_PLATFORMS
        )
        for name, value in fields.items():
            setattr(request, name, value)
        return request

    half = ledger_pb2.ProposeFundingRequest(pool_id=pool, amount_fen=5_000, source="district")
    half.tranches.add(amount_fen=2_500).releases_at.FromDatetime(dt.datetime.now(dt.UTC))
    untimed = ledger_pb2.ProposeFundingRequest(pool_id=pool, amount_fen=5_000, source="district")
    untimed.tranches.add(amount_fen=5_000)
    for request, expected in (
        (funding(source="lottery"), (INVALID, "UNKNOWN_SOURCE", "source")),
        (funding(amount_fen=-1), (INVALID, "INVALID_AMOUNT", "amount_fen")),
        (funding(amount_fen=0), (INVALID, "INVALID_AMOUNT", "amount_fen")),
        (funding(amount_fen=10**14 + 1), (INVALID, "INVALID_AMOUNT", "amount_fen")),
        (half, (INVALID, "INVALID_TRANCHES", "tranches")),
        (untimed, (INVALID, "INVALID_TRANCHES", "tranches")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.ledger.ProposeFunding(request)
        assert status_of(err.value) == expected
    # Self-approval: the proposer, with an approver's certificate, is still the proposer.
    operator, same_person = (
        ledger_as(p, Caller(r, "zhao")) for r in (Role.OPERATOR, Role.APPROVER)
    )
    proposal = await operator.ProposeFunding(funding())
    after_proposal = await ledger_events(p)
    approve = ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="mine")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await same_person.ApproveFunding(approve)
    assert status_of(err.value) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MAKER_CHECKER",
        "proposal_id",
    )
    assert await ledger_events(p) == after_proposal == before + 1  # the proposal only
    assert await budget(p, pool) == figures
