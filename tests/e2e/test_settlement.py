"""Merchant settlement on the real stack: evidence, batches (maker-checker), paid, clawbacks.

A batch pays a merchant's evidenced, unrefunded captures of its period, less the merchant's
outstanding clawbacks; a refund after settlement is clawed back from the next batch. Each step
is read back from the RPC answers and the events in the merchant's settlement stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import grpc
import pytest

from services.kernel.contract.budget import pool_stream
from services.kernel.events import Context, payload_of
from services.kernel.identity import Caller, Role
from services.ledger import settlement
from services.ledger import settlement_domain as sd
from services.ledger.handlers import Ledger
from subsidy.v1 import common_pb2, ledger_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_funding_sources import PHONE_PRICE, checkout, ledger_as, ledger_events

SUBSIDY = 45_000  # 15 % of PHONE_PRICE


async def paid_order(p: Platform, pool: str, sku: str) -> str:
    order, _ = await checkout(p, pool, sku, "phone", PHONE_PRICE)
    await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(
            order_id=order, payment_ref=f"pay-{order}", paid_amount_fen=PHONE_PRICE - SUBSIDY
        )
    )
    return order


async def evidence(p: Platform, order: str, **kw: str) -> ledger_pb2.OrderEvidence:
    request = ledger_pb2.RecordEvidenceRequest(
        order_id=order, kind=kw.get("kind", "COURIER"), reference=kw.get("reference", "SF1")
    )
    request.serial = kw.get("serial", "")
    return await p.ledger.RecordEvidence(request)


async def pool_events(p: Platform, pool: str) -> int:
    """Events of the pool's stream, where its orders' evidence is recorded (the ledger's other
    streams move with other tests' sweepers meanwhile)."""
    return len(await p.running["ledger"].runtime.store.read_stream(pool_stream(pool)))


def period(request: ledger_pb2.CreateSettlementBatchRequest) -> None:
    now = dt.datetime.now(dt.UTC)
    request.period_from.FromDatetime(now - dt.timedelta(hours=1))
    request.period_to.FromDatetime(now + dt.timedelta(hours=1))


async def merchant_events(p: Platform, merchant: str) -> list[object]:
    store = p.running["ledger"].runtime.store
    return [payload_of(e) for e in await store.read_stream(f"settlement/{merchant}")]


async def test_a_batch_pays_evidenced_captures_and_a_later_refund_is_clawed_back(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    shipped, unshipped, returned = [await paid_order(p, pool, sku) for _ in range(3)]
    answer = await evidence(p, shipped)
    assert (answer.merchant_id, answer.kind) == (merchant, "COURIER")
    assert await evidence(p, shipped) == answer  # the same evidence again: unchanged
    await evidence(p, returned)

    maker = ledger_as(p, Caller(Role.OPERATOR, "ops-a"))
    same = ledger_as(p, Caller(Role.APPROVER, "ops-a"))
    checker = ledger_as(p, Caller(Role.APPROVER, "ops-b"))
    first = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant, reason="June"
    )
    period(first)
    batch = await maker.CreateSettlementBatch(first)
    assert batch.status == "CREATED" and batch.created_by == "ops-a"
    assert sorted(line.order_id for line in batch.lines) == sorted([shipped, returned])
    assert (batch.gross_fen, batch.clawback_fen, batch.net_fen) == (2 * SUBSIDY, 0, 2 * SUBSIDY)

    before = await ledger_events(p)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await same.ApproveSettlementBatch(
            ledger_pb2.ApproveSettlementBatchRequest(batch_id=first.batch_id)
        )
    assert status_of(err.value) == (grpc.StatusCode.PERMISSION_DENIED, "MAKER_CHECKER", "batch_id")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # not approved: cannot be paid
        await maker.MarkSettlementBatchPaid(
            ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=first.batch_id, payment_ref="x-1")
        )
    assert status_of(err.value)[1] == "BATCH_NOT_APPROVED"
    assert await ledger_events(p) == before
    approve = ledger_pb2.ApproveSettlementBatchRequest(batch_id=first.batch_id, reason="ok")
    approved = await checker.ApproveSettlementBatch(approve)
    assert (approved.status, approved.approved_by) == ("APPROVED", "ops-b")
    assert await checker.ApproveSettlementBatch(approve) == approved  # unchanged
    pay = ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=first.batch_id, payment_ref="x-1")
    paid = await maker.MarkSettlementBatchPaid(pay)
    assert (paid.status, paid.payment_ref, paid.net_fen) == ("PAID", "x-1", 2 * SUBSIDY)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await maker.MarkSettlementBatchPaid(
            ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=first.batch_id, payment_ref="x-2")
        )
    assert status_of(err.value)[1] == "BATCH_PAID"

    # A refund after settlement: a clawback, deducted from the next batch.
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=returned, reason="REFUNDED")
    )
    clawbacks = [
        e for e in await merchant_events(p, merchant) if isinstance(e, ev.ClawbackRecorded)
    ]
    assert [(c.order_id, c.fen, c.batch_id) for c in clawbacks] == [
        (returned, SUBSIDY, first.batch_id)
    ]
    await evidence(p, unshipped)
    second = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant
    )
    period(second)
    next_batch = await maker.CreateSettlementBatch(second)
    assert [line.order_id for line in next_batch.lines] == [unshipped]
    assert [(c.order_id, c.fen) for c in next_batch.clawbacks] == [(returned, SUBSIDY)]
    assert (next_batch.gross_fen, next_batch.net_fen) == (SUBSIDY, 0)
    # Every fen owed is an evidenced, unrefunded capture's (shipped, unshipped): the refunded
    # order's subsidy, paid in the first batch, was clawed back from the second.
    assert paid.net_fen + next_batch.net_fen == 2 * SUBSIDY
    with pytest.raises(grpc.aio.AioRpcError) as err:  # nothing left to settle
        third = ledger_pb2.CreateSettlementBatchRequest(
            batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant
        )
        period(third)
        await maker.CreateSettlementBatch(third)
    assert status_of(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOTHING_TO_SETTLE",
        "merchant_id",
    )
    got = await p.ledger.GetSettlementBatch(
        ledger_pb2.GetSettlementBatchRequest(batch_id=first.batch_id)
    )
    assert got == paid  # immutable once approved: the same lines and figures
    # The returns ledger lists the refund, the batch that had paid it, and its clawback's fate.
    ledger = await p.ledger.ListReturns(ledger_pb2.ListReturnsRequest(merchant_id=merchant))
    assert [
        (r.order_id, r.subsidy_fen, r.batch_id, r.clawback, r.deducted_by) for r in ledger.returns
    ] == [(returned, SUBSIDY, first.batch_id, "DEDUCTED", second.batch_id)]
    assert ledger.returns[0].refunded_at.ToDatetime() >= ledger.returns[0].captured_at.ToDatetime()


async def test_the_returns_ledger_lists_a_refund_before_settlement_with_nothing_to_claw_back(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    order = await paid_order(p, pool, sku)
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
    )
    settled = await p.ledger.ListReturns(ledger_pb2.ListReturnsRequest(merchant_id=merchant))
    assert [(r.order_id, r.batch_id, r.clawback) for r in settled.returns] == [(order, "", "NONE")]
    assert [e for e in await merchant_events(p, merchant)] == []  # no clawback recorded


async def test_captures_without_evidence_past_the_policy_days_are_listed(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    late, evidenced = await paid_order(p, pool, sku), await paid_order(p, pool, sku)
    await evidence(p, evidenced)
    ledger: Ledger = p.running["ledger"].wiring.registrations[0][1].ledger
    real = ledger.clock
    request = ledger_pb2.ListOverdueEvidenceRequest(merchant_id=merchant)
    try:  # the session's policy says nothing: 30 days
        ledger.clock = lambda: real() + dt.timedelta(days=29, hours=23)
        assert list((await p.ledger.ListOverdueEvidence(request)).captures) == []
        ledger.clock = lambda: real() + dt.timedelta(days=30, minutes=1)
        [listed] = (await p.ledger.ListOverdueEvidence(request)).captures
    finally:
        ledger.clock = real
    assert (listed.order_id, listed.merchant_id, listed.subsidy_fen) == (late, merchant, SUBSIDY)
    due = listed.due_at.ToDatetime() - listed.captured_at.ToDatetime()
    assert due == dt.timedelta(days=30)


async def test_a_serialised_unit_is_evidenced_by_its_own_activation_only(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    _, consumer = await p.person(rng)
    qualification = await p.claim(consumer, "phone")
    order, serial = f"o-{rng.randrange(10**12)}", f"IMEI{rng.randrange(10**14):015d}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumer,
            qualification_id=qualification,
            sku=sku,
            unit_price_fen=PHONE_PRICE,
            serial=serial,
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:  # not captured yet
        await evidence(p, order)
    assert status_of(err.value)[1] == "UNKNOWN_ORDER"
    await p.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=order))
    before = await pool_events(p, pool)
    refusals = [
        ({"kind": "COURIER"}, "ACTIVATION_REQUIRED", "kind"),
        ({"kind": "ACTIVATION", "serial": "IMEI000000000000001"}, "SERIAL_MISMATCH", "serial"),
    ]
    for fields, reason, field in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await evidence(p, order, **fields)
        assert status_of(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, reason, field)
    assert await pool_events(p, pool) == before
    done = await evidence(p, order, kind="ACTIVATION", serial=serial, reference="act-1")
    assert (done.kind, done.serial) == ("ACTIVATION", serial)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # other evidence for an evidenced order
        await evidence(p, order, kind="ACTIVATION", serial=serial, reference="act-2")
    assert status_of(err.value)[1] == "EVIDENCE_RECORDED"


async def test_a_refund_racing_a_batch_is_either_left_out_or_clawed_back(
    platform: Platform, rng: random.Random
) -> None:
    """The refund and the batch both lock the merchant's settlement stream: whichever comes
    second sees the other, so no refunded order is paid without its clawback."""
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    orders = [await paid_order(p, pool, sku) for _ in range(6)]
    for order in orders:
        await evidence(p, order)
    refunds = [
        p.ledger.ReleaseSubsidy(ledger_pb2.ReleaseSubsidyRequest(order_id=o, reason="REFUNDED"))
        for o in orders[::2]
    ]
    request = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant
    )
    period(request)
    *_, batch = await asyncio.gather(*refunds, p.ledger.CreateSettlementBatch(request))
    assert isinstance(batch, ledger_pb2.SettlementBatch)
    paid = {line.order_id for line in batch.lines}
    clawed = {
        e.order_id for e in await merchant_events(p, merchant) if isinstance(e, ev.ClawbackRecorded)
    }
    refunded = set(orders[::2])
    assert paid >= set(orders[1::2])  # the unrefunded ones are all paid
    assert paid & refunded == clawed  # a refunded order in the batch is clawed back, and only it


async def refund_of(p: Platform, order: str) -> ledger_pb2.Reservation:
    request = ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
    answer: ledger_pb2.Reservation = await p.ledger.ReleaseSubsidy(request)
    return answer


async def test_a_refund_waits_for_a_batch_being_made_and_then_claws_it_back(
    platform: Platform, rng: random.Random
) -> None:
    """The refund's moment of truth, forced: a batch is being made (its transaction holds the
    merchant's settlement stream) when the order is refunded. The refund waits for it, then
    sees the batch and records the clawback."""
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    order = await paid_order(p, pool, sku)
    await evidence(p, order)
    ledger: Ledger = p.running["ledger"].wiring.registrations[0][1].ledger
    now = dt.datetime.now(dt.UTC)
    cmd = sd.CreateBatch(f"sb-{rng.randrange(10**9)}", merchant, now - dt.timedelta(hours=1), now)
    actor = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="ops-a")
    async with ledger.store.transaction() as tx:
        await ledger.pipeline.run(
            settlement.MERCHANT,
            settlement.MerchantKey(merchant, cmd.batch_id, cmd),
            lambda state: sd.create_batch(None, state.payable if state else (), (), cmd),
            Context(actor, correlation_id=cmd.batch_id),
            tx=tx,
            reload=False,
        )
        refund = asyncio.ensure_future(refund_of(p, order))
        await asyncio.sleep(1.0)
        assert not refund.done()  # waiting on the merchant's stream
    released = await refund
    assert released.status == "RELEASED"
    events = await merchant_events(p, merchant)
    assert [type(e).__name__ for e in events] == ["SettlementBatchCreated", "ClawbackRecorded"]
    claw = events[1]
    assert isinstance(claw, ev.ClawbackRecorded)
    assert (claw.order_id, claw.batch_id, claw.fen) == (order, cmd.batch_id, SUBSIDY)
