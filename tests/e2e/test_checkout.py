"""One subsidised checkout through all four services, on the real stack."""

from __future__ import annotations

import random

import grpc
import pytest
from prometheus_client import REGISTRY

from services.invariants import check_audit_complete, check_budget_balanced
from services.kernel import rpc
from subsidy.v1 import audit_pb2, eligibility_pb2, ledger_pb2
from tests.e2e.conftest import DEMO_POLICY_VERSION, Platform, eventually, status_of


async def budget(p: Platform, pool_id: str) -> ledger_pb2.BudgetPool:
    b = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
    check_budget_balanced(
        pool_id,
        funded=b.funded_fen,
        available=b.available_fen,
        reserved=b.reserved_fen,
        spent=b.spent_fen,
    )
    return b


async def test_register_claim_reserve_capture(platform: Platform, rng: random.Random) -> None:
    p = platform
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "refrigerator", 1, 1_200_000)
    pool = await p.pool(rng, 10_000_000)
    q_id = await p.claim(consumer, "refrigerator")
    claimed = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=q_id)
    )
    assert claimed.status == "AVAILABLE"
    order = f"o-{rng.randrange(10**12)}"
    res = await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=q_id,
            sku=sku,
            unit_price_fen=1_200_000,
        )
    )
    # Grade-1 refrigerator at 12,000 yuan: 20% capped at 2,000 yuan.
    assert (res.status, res.subsidy_fen, res.policy_version) == (
        "PENDING",
        200_000,
        DEMO_POLICY_VERSION,
    )
    b = await budget(p, pool)
    assert (b.available_fen, b.reserved_fen, b.spent_fen) == (9_800_000, 200_000, 0)
    locked = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=q_id)
    )
    assert (locked.status, locked.order_id) == ("LOCKED", order)

    # The platform retries the same reserve: the same reservation, no second hold.
    again = await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=q_id,
            sku=sku,
            unit_price_fen=1_200_000,
        )
    )
    assert again.subsidy_fen == 200_000
    assert (await budget(p, pool)).reserved_fen == 200_000

    cap = await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="pay-1")
    )
    assert cap.status == "CAPTURED"
    b = await budget(p, pool)
    assert (b.available_fen, b.reserved_fen, b.spent_fen) == (9_800_000, 0, 200_000)
    await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="pay-1")
    )
    assert (await budget(p, pool)).spent_fen == 200_000  # capture is idempotent

    async def used() -> None:
        got = await p.eligibility.GetQualification(
            eligibility_pb2.GetQualificationRequest(qualification_id=q_id)
        )
        assert got.status == "USED"

    await eventually(used)  # eligibility learns of the payment from the ledger's event


async def test_cancel_releases_budget_and_qualification(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    q_id = await p.claim(consumer, "phone")
    order = f"o-{rng.randrange(10**12)}"
    res = await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=q_id,
            sku=sku,
            unit_price_fen=300_000,
        )
    )
    assert res.subsidy_fen == 45_000
    rel = await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="CANCELLED")
    )
    assert (rel.status, rel.release_reason) == ("RELEASED", "CANCELLED")
    b = await budget(p, pool)
    assert (b.available_fen, b.reserved_fen, b.spent_fen) == (1_000_000, 0, 0)

    async def available() -> None:
        got = await p.eligibility.GetQualification(
            eligibility_pb2.GetQualificationRequest(qualification_id=q_id)
        )
        assert got.status == "AVAILABLE"

    await eventually(available)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
    assert status_of(err.value)[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_NOT_PENDING",
    )


async def test_fifty_concurrent_reservations_never_overspend(
    platform: Platform, rng: random.Random
) -> None:
    """50 checkouts race for a budget that fits only 20 of them: exactly 20 win, none overspend."""
    import asyncio

    p = platform
    sku = await p.product(rng, "washing_machine", 2, 500_000)  # 15% of 5,000 yuan = 75,000 fen
    pool = await p.pool(rng, 20 * 75_000 + 74_999)
    people = await asyncio.gather(*(p.person(rng) for _ in range(50)))
    quals = await asyncio.gather(*(p.claim(c, "washing_machine") for _, c in people))

    async def checkout(i: int) -> str:
        try:
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=f"race-{pool}-{i}",
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=people[i][1],
                    qualification_id=quals[i],
                    sku=sku,
                    unit_price_fen=500_000,
                )
            )
            return "ok"
        except grpc.aio.AioRpcError as err:
            code, reason, _ = status_of(err)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, reason)
            return reason

    outcomes = await asyncio.gather(*(checkout(i) for i in range(50)))
    assert outcomes.count("ok") == 20
    assert outcomes.count("BUDGET_EXHAUSTED") == 30
    b = await budget(p, pool)
    assert (b.reserved_fen, b.available_fen) == (20 * 75_000, 74_999)

    async def refused_unlocked() -> None:
        statuses = [
            (
                await p.eligibility.GetQualification(
                    eligibility_pb2.GetQualificationRequest(qualification_id=q)
                )
            ).status
            for q in quals
        ]
        assert statuses.count("LOCKED") == 20 and statuses.count("AVAILABLE") == 30

    # Refusals after the lock are recorded as ReservationRefused; eligibility unlocks on it.
    await eventually(refused_unlocked)
    # Operators see the same figures on /metrics.
    assert REGISTRY.get_sample_value(
        "subsidy_budget_fen", {"pool": pool, "bucket": "available"}
    ) == float(74_999)
    refused = REGISTRY.get_sample_value(
        "subsidy_rpc_refusals_total",
        {"method": "/subsidy.v1.LedgerService/ReserveSubsidy", "reason": "BUDGET_EXHAUSTED"},
    )
    assert refused is not None and refused >= 30
    await p.running["eligibility"].wiring.registrations[0][1].e.check_limits()


async def test_every_event_reaches_the_audit_log_exactly_once(platform: Platform) -> None:
    p = platform

    async def complete() -> None:
        service_ids = {}
        for name, r in p.running.items():
            recs = await r.runtime.store.read_all(limit=100_000)
            service_ids[name] = [x.envelope.event_id for x in recs]
        info = await p.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
        audit_ids: list[str] = []
        start = 0
        while start < info.size:
            page = await p.audit.GetEntries(audit_pb2.GetEntriesRequest(start=start, limit=1000))
            audit_ids += [e.envelope.event_id for e in page.entries]
            start += len(page.entries)
        check_audit_complete(service_ids, audit_ids)
        assert info.size == sum(len(v) for v in service_ids.values()) > 0

    await eventually(complete, within=30)


async def test_one_unit_is_subsidised_once_even_when_two_orders_race(
    platform: Platform, rng: random.Random
) -> None:
    """Two orders race with the same IMEI before catalog has seen either: the ledger's unique
    serial index lets exactly one hold the unit; the other is refused and its lock undone."""
    import asyncio

    from sqlalchemy import select

    from services.invariants import check_serial_once
    from services.ledger.projections import reservations

    p = platform
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    imei = f"IMEI{rng.randrange(10**15):015d}"
    people = [await p.person(rng) for _ in range(2)]
    quals = [await p.claim(c, "phone") for _, c in people]

    async def reserve(i: int) -> str:
        try:
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=f"imei-{imei}-{i}",
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=people[i][1],
                    qualification_id=quals[i],
                    sku=sku,
                    unit_price_fen=300_000,
                    serial=imei,
                )
            )
            return "ok"
        except grpc.aio.AioRpcError as err:
            code, reason, field = status_of(err)
            info = rpc.error_info(err)
            assert info is not None
            if field == "sku":  # catalog saw the other order first: its reasons are the unit's
                assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ITEM_NOT_ELIGIBLE")
                return str(info.metadata["reasons"])
            assert (code, field) == (grpc.StatusCode.FAILED_PRECONDITION, "serial"), (code, reason)
            return reason

    outcomes = sorted(await asyncio.gather(reserve(0), reserve(1)))
    assert outcomes[1] == "ok" and outcomes[0] in ("SERIAL_ALREADY_SUBSIDISED", "SERIAL_RESERVED")
    b = await budget(p, pool)
    assert b.reserved_fen == 45_000  # one hold, not two
    await p.quiesce()
    ledger = p.running["ledger"].runtime.store
    async with ledger.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(reservations.c.serial, reservations.c.order_id)
                .where(reservations.c.serial != "")
                .where(reservations.c.status.in_(("PENDING", "CAPTURED")))
            )
        ).all()
    check_serial_once([(s, o) for s, o in rows])
    assert [s for s, _ in rows].count(imei) == 1
    statuses = sorted(
        [
            (
                await p.eligibility.GetQualification(
                    eligibility_pb2.GetQualificationRequest(qualification_id=q)
                )
            ).status
            for q in quals
        ]
    )
    assert statuses == ["AVAILABLE", "LOCKED"]  # the loser's qualification was given back


async def test_the_audit_log_alone_adds_up_to_every_budget_the_ledger_reports(
    platform: Platform,
) -> None:
    """subsidyctl audit verify: recompute the chain and rebuild each pool from the log."""
    from subsidyctl.cli.audit import verify

    await platform.quiesce()
    report = await verify(platform.audit, platform.ledger, platform.event_logs)
    assert report["ok"] and report["entries"] > 0
    assert len(report["pools"]) >= 3  # every pool the tests above funded
    for pool_id, figures in report["pools"].items():
        b = await budget(platform, pool_id)
        assert figures == {
            "funded_fen": b.funded_fen,
            "available_fen": b.available_fen,
            "reserved_fen": b.reserved_fen,
            "spent_fen": b.spent_fen,
        }


async def test_one_unit_under_two_spellings_is_still_one_unit(
    platform: Platform, rng: random.Random
) -> None:
    """abc-123 and ABC123 are the same serial: the second order is refused."""
    p = platform
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    base = f"sn{rng.randrange(10**12)}"
    spellings = [base.lower(), "-".join((base[:4].upper(), base[4:].upper()))]
    outcomes = []
    for i, spelling in enumerate(spellings):
        _, consumer = await p.person(rng)
        q_id = await p.claim(consumer, "phone")
        try:
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=f"sp-{base}-{i}",
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=consumer,
                    qualification_id=q_id,
                    sku=sku,
                    unit_price_fen=300_000,
                    serial=spelling,
                )
            )
            outcomes.append("ok")
        except grpc.aio.AioRpcError as err:
            info = rpc.error_info(err)
            assert info is not None
            # The ledger's index, or catalog's view of the ledger (then inside ITEM_NOT_ELIGIBLE).
            outcomes.append(info.metadata.get("reasons") or info.reason)
    assert outcomes[0] == "ok"
    assert outcomes[1] in ("SERIAL_ALREADY_SUBSIDISED", "SERIAL_RESERVED")
