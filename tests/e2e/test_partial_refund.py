"""Partial refunds of a multi-item order on the real stack.

A multi-item order is one reservation per item (``order_id`` + ``item``), each with its own
qualification: refunding one item after its merchant was settled credits back exactly that
item's sources, claws back exactly that item's subsidy, gives that item's qualification back
(restored under the session's policy; forfeited under an order policy that forfeits) and
leaves the other items captured, used and paid. The discount bill still lists the order once,
with the discount of all its items. Calls that name no item of a multi-item order, an item it
does not have, or an item of another order are refused precisely and change nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.catalog.handlers import Catalog
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, eligibility_pb2, ledger_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_funding_sources import budget, by_source, ledger_as, ledger_events
from tests.e2e.test_paid_amount_refuse import publish_from_2150
from tests.e2e.test_reconciliation import csv_of, reconcile_bill
from tests.e2e.test_settlement import merchant_events, period

# (category, price, subsidy): 15 % of each price, each under its cap.
ITEMS = (("phone", 300_000, 45_000), ("tablet", 200_000, 30_000), ("smartwatch", 100_000, 15_000))


@pytest.fixture
def catalog(platform: Platform) -> Iterator[Catalog]:
    found: Catalog = platform.running["catalog"].wiring.registrations[0][1].catalog
    real = found.now
    yield found
    found.now = real


async def products(p: Platform, rng: random.Random) -> tuple[str, list[str]]:
    """One approved merchant selling a product of each of ITEMS' categories."""
    n = rng.randrange(10**9)
    merchant = f"m-{n}"
    await p.catalog.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id=merchant,
            name=f"商户{n}",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    await p.catalog.ReviewMerchant(
        catalog_pb2.ReviewMerchantRequest(merchant_id=merchant, approve=True)
    )
    skus = []
    for category, price, _ in ITEMS:
        sku = f"sku-{n}-{category}"
        await p.catalog.RegisterProduct(
            catalog_pb2.RegisterProductRequest(
                sku=sku,
                merchant_id=merchant,
                category=category,
                grade=0,
                brand="Brand",
                model=f"M{n}",
                list_price_fen=price,
            )
        )
        skus.append(sku)
    return merchant, skus


async def qualification(p: Platform, qid: str) -> tuple[str, str]:
    q = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=qid)
    )
    return q.status, q.order_id


async def refused(call: object, code: grpc.StatusCode, reason: str, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert status_of(err.value) == (code, reason, field)


async def test_refunding_one_settled_item_claws_back_that_item_only(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool, amount_fen=250_000, source="platform-matching", reason="matching"
        )
    )
    merchant, skus = await products(p, rng)
    _, consumer = await p.person(rng)
    qids = [await p.claim(consumer, category) for category, _, _ in ITEMS]
    order = f"o-{rng.randrange(10**12)}"
    start = datetime.now(UTC)
    for i, (sku, qid, (_, price, subsidy)) in enumerate(zip(skus, qids, ITEMS, strict=True), 1):
        held = await p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                item=str(i),
                platform_id="jd",
                pool_id=pool,
                consumer_id=consumer,
                qualification_id=qid,
                sku=sku,
                unit_price_fen=price,
            )
        )
        assert (held.order_id, held.item, held.qualification_id, held.subsidy_fen) == (
            order,
            str(i),
            qid,
            subsidy,
        )
    # Each item locked its own qualification, to its own line of the order.
    for i, qid in enumerate(qids, 1):
        assert await qualification(p, qid) == ("LOCKED", f"{order}/{i}")

    # Bad input, refused precisely, changing nothing.
    other = f"o-{rng.randrange(10**12)}"
    before = await ledger_events(p)
    await refused(
        p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ITEM_REQUIRED",
        "item",
    )
    await refused(
        p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(order_id=order, item="9", payment_ref="x")
        ),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_ITEM",
        "item",
    )
    await refused(  # item 2 of an order the ledger never saw (it is another order's item)
        p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=other, item="2", reason="CANCELLED")
        ),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_ORDER",
        "order_id",
    )
    await refused(
        p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=order, item="2", reason="REFUNDED")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_CAPTURED",
        "reason",
    )
    await refused(  # the whole of an order reserved item by item
        p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id="jd",
                pool_id=pool,
                consumer_id=consumer,
                qualification_id=qids[0],
                sku=skus[0],
                unit_price_fen=ITEMS[0][1],
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ORDER_ID_REUSED",
        "item",
    )
    await refused(
        p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id="o-" + "9" * 60, item="12345", platform_id="jd", pool_id=pool
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_TOO_LONG",
        "item",
    )
    assert await ledger_events(p) == before

    # Paid: each item captured with its own paid amount, one payment for the order.
    for i, (_, price, subsidy) in enumerate(ITEMS, 1):
        paid = await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order,
                item=str(i),
                payment_ref=f"pay-{order}",
                paid_amount_fen=price - subsidy,
            )
        )
        assert (paid.status, paid.item, paid.capture_flag) == ("CAPTURED", str(i), "")
    for i, qid in enumerate(qids, 1):
        await eventually(lambda qid=qid, i=i: _is(p, qid, ("USED", f"{order}/{i}")))  # type: ignore[misc]
    operator = ledger_as(p, Caller(Role.OPERATOR, "ops-a"))
    # The bill lists the order once, with the discount of all three items.
    total = sum(s for _, _, s in ITEMS)
    bill = csv_of((order, f"pay-{order}", total, start))
    answer = await reconcile_bill(operator, bill, (start, datetime.now(UTC)), platform_id="jd")
    assert answer.kinds() == []
    assert (answer.recorded.ledger_total_fen, answer.recorded.bill_total_fen) == (total, total)

    # Settled: each item is a line of the merchant's batch.
    for i in range(1, 4):
        await p.ledger.RecordEvidence(
            ledger_pb2.RecordEvidenceRequest(
                order_id=order, item=str(i), kind="COURIER", reference="SF1"
            )
        )
    checker = ledger_as(p, Caller(Role.APPROVER, "ops-b"))
    create = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant
    )
    period(create)
    batch = await operator.CreateSettlementBatch(create)
    assert sorted((line.order_id, line.subsidy_fen) for line in batch.lines) == [
        (f"{order}/{i}", subsidy) for i, (_, _, subsidy) in enumerate(ITEMS, 1)
    ]
    await checker.ApproveSettlementBatch(
        ledger_pb2.ApproveSettlementBatchRequest(batch_id=create.batch_id)
    )
    await operator.MarkSettlementBatchPaid(
        ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=create.batch_id, payment_ref="x-1")
    )

    # Refund the tablet (item 2) only.
    tablet = await p.ledger.GetReservation(
        ledger_pb2.GetReservationRequest(order_id=order, item="2")
    )
    parts = {s.source: s.fen for s in tablet.sources}
    assert sum(parts.values()) == ITEMS[1][2] and len(parts) == 2
    figures = by_source(await budget(p, pool))
    refund = ledger_pb2.ReleaseSubsidyRequest(order_id=order, item="2", reason="REFUNDED")
    released = await p.ledger.ReleaseSubsidy(refund)
    assert (released.order_id, released.item, released.status) == (order, "2", "RELEASED")
    after = by_source(await budget(p, pool))
    for source, (funded, available, reserved, spent) in figures.items():
        assert after[source] == (
            funded,
            available + parts[source],
            reserved,
            spent - parts[source],
        )
    clawbacks = [
        (e.order_id, e.fen, e.batch_id)
        for e in await merchant_events(p, merchant)
        if isinstance(e, ev.ClawbackRecorded)
    ]
    assert clawbacks == [(f"{order}/2", ITEMS[1][2], create.batch_id)]
    for i in (1, 3):
        kept = await p.ledger.GetReservation(
            ledger_pb2.GetReservationRequest(order_id=order, item=str(i))
        )
        assert (kept.status, kept.release_reason) == ("CAPTURED", "")
    # That item's qualification is given back (the session's policy restores it); the others
    # stay used by their items.
    await eventually(lambda: _is(p, qids[1], ("AVAILABLE", "")))
    assert await qualification(p, qids[0]) == ("USED", f"{order}/1")
    assert await qualification(p, qids[2]) == ("USED", f"{order}/3")
    returns = await p.ledger.ListReturns(ledger_pb2.ListReturnsRequest(merchant_id=merchant))
    assert [
        (r.order_id, r.item, r.subsidy_fen, r.batch_id, r.clawback) for r in returns.returns
    ] == [(order, "2", ITEMS[1][2], create.batch_id, "OUTSTANDING")]

    # The same refund again is the refund already made: nothing more moves.
    before = await ledger_events(p)
    assert await p.ledger.ReleaseSubsidy(refund) == released
    assert await ledger_events(p) == before
    assert by_source(await budget(p, pool)) == after
    # Partly refunded, the order is still owed in the bill at the discount of its payment.
    again = await reconcile_bill(
        operator, bill + b"\n", (start, datetime.now(UTC)), platform_id="jd"
    )
    assert [k for k, o in again.kinds() if o == order] == []
    assert again.recorded.ledger_total_fen >= total


async def _is(p: Platform, qid: str, expected: tuple[str, str]) -> None:
    assert await qualification(p, qid) == expected


async def test_a_refunded_item_forfeits_its_qualification_under_a_forfeiting_order_policy(
    platform: Platform, rng: random.Random, catalog: Catalog
) -> None:
    """The order's own policy version forfeits refunded qualifications: refunding one item
    forfeits exactly that item's; the other item's stays used (and its budget spent)."""
    p = platform
    pool = await p.pool(rng, 1_000_000)
    _, skus = await products(p, rng)
    _, consumer = await p.person(rng)
    qids = [await p.claim(consumer, category) for category, _, _ in ITEMS[:2]]
    effective = await publish_from_2150(p, catalog, rng, "forfeit on refund", refund_rule="forfeit")
    order = f"o-{rng.randrange(10**12)}"
    real = catalog.now
    catalog.now = lambda: effective + timedelta(hours=12)  # the forfeiting version rules
    try:
        for i, (sku, qid, (_, price, _)) in enumerate(zip(skus, qids, ITEMS, strict=False), 1):
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=order,
                    item=str(i),
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=consumer,
                    qualification_id=qid,
                    sku=sku,
                    unit_price_fen=price,
                )
            )
    finally:
        catalog.now = real
    for i, (_, price, subsidy) in enumerate(ITEMS[:2], 1):
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order, item=str(i), payment_ref="pay", paid_amount_fen=price - subsidy
            )
        )
    await eventually(lambda: _is(p, qids[0], ("USED", f"{order}/1")))

    async def consumed() -> None:  # the payment, as eligibility sees it for that item
        q = await p.eligibility.ConsumeQualification(
            eligibility_pb2.ConsumeQualificationRequest(
                qualification_id=qids[1], order_id=order, item="2"
            )
        )
        assert (q.status, q.order_id) == ("USED", f"{order}/2")

    await eventually(consumed)
    spent = (await budget(p, pool)).spent_fen
    released = await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, item="1", reason="REFUNDED")
    )
    assert released.policy_version.startswith("from-2150-")
    await eventually(lambda: _is(p, qids[0], ("FORFEITED", f"{order}/1")))
    assert await qualification(p, qids[1]) == ("USED", f"{order}/2")
    assert (await budget(p, pool)).spent_fen == spent - ITEMS[0][2]


async def test_the_auditor_rebuilds_the_returns_of_refunded_items(
    platform: Platform, rng: random.Random
) -> None:
    """Each refunded item is a row of the returns ledger under its line (order/item), in the
    log's rebuild and in ListReturns alike: `audit verify` finds no difference after the
    partial refunds above (it reported every refunded item twice, once on each side, when the
    live rows were keyed by the order alone)."""
    from subsidyctl.cli.audit import verify

    await platform.quiesce()
    report = await verify(platform.audit, platform.ledger, platform.event_logs)
    assert report["ok"] and report["differences"] == []
    returns = await platform.ledger.ListReturns(ledger_pb2.ListReturnsRequest(limit=500))
    items = [r for r in returns.returns if r.item]
    assert items  # the tests above refunded items of multi-item orders
    assert report["totals_compared"]["returns"] >= len(items)
