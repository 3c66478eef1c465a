"""Capture records what the consumer paid on the real stack: the session's policy (subsidyctl/
demo.yaml) has no ``paid_amount`` rule, so it flags (the default of versions published before
the rule): a matching amount captures clean, a mismatch or no amount captures flagged, a
malformed amount is refused at the edge and changes nothing."""

from __future__ import annotations

import random

import grpc
import pytest
from sqlalchemy import text

from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_funding_sources import PHONE_PRICE, checkout, ledger_events, pool_events

SUBSIDY = 45_000  # 15 % of PHONE_PRICE


async def test_capture_records_the_paid_amount_and_flags_a_mismatch(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    declared = {"exact": PHONE_PRICE - SUBSIDY, "full-price": PHONE_PRICE, "none": None}
    answers: dict[str, ledger_pb2.Reservation] = {}
    orders: dict[str, str] = {}
    for name, paid in declared.items():
        orders[name], _ = await checkout(p, pool, phone, "phone", PHONE_PRICE)
        request = ledger_pb2.CaptureSubsidyRequest(order_id=orders[name], payment_ref=f"pay-{name}")
        if paid is not None:
            request.paid_amount_fen = paid
        answers[name] = await p.ledger.CaptureSubsidy(request)
    assert {n: (a.status, a.capture_flag) for n, a in answers.items()} == {
        "exact": ("CAPTURED", ""),
        "full-price": ("CAPTURED", "PAID_AMOUNT_MISMATCH"),
        "none": ("CAPTURED", "PAID_AMOUNT_MISSING"),
    }
    assert answers["exact"].paid_amount_fen == PHONE_PRICE - SUBSIDY
    assert not answers["none"].HasField("paid_amount_fen")
    assert answers["full-price"].payment_ref == "pay-full-price"
    # The event carries both, so a replay rebuilds the same reservation.
    captures = {
        e.order_id: (e.paid_amount_fen if e.HasField("paid_amount_fen") else None, e.flag)
        for e in await pool_events(p, pool)
        if isinstance(e, ev.SubsidyCaptured)
    }
    assert captures == {
        orders["exact"]: (PHONE_PRICE - SUBSIDY, ""),
        orders["full-price"]: (PHONE_PRICE, "PAID_AMOUNT_MISMATCH"),
        orders["none"]: (None, "PAID_AMOUNT_MISSING"),
    }
    async with p.running["ledger"].runtime.store.engine.connect() as conn:
        stored = await conn.execute(
            text(
                "SELECT order_id, paid_amount_fen, capture_flag FROM reservations"
                " WHERE order_id = ANY(:o)"
            ),
            {"o": list(orders.values())},
        )
        assert {r.order_id: (r.paid_amount_fen, r.capture_flag) for r in stored} == captures
    # A retry of a capture is the capture posted, whatever amount it declares now.
    again = await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=orders["exact"], paid_amount_fen=1)
    )
    assert (again.capture_flag, again.paid_amount_fen) == ("", PHONE_PRICE - SUBSIDY)


@pytest.mark.parametrize("paid", [-1, 10**12])
async def test_a_malformed_paid_amount_is_refused_and_changes_nothing(
    platform: Platform, rng: random.Random, paid: int
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    order, _ = await checkout(p, pool, phone, "phone", PHONE_PRICE)
    before = await ledger_events(p)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(order_id=order, paid_amount_fen=paid)
        )
    assert status_of(err.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_AMOUNT",
        "paid_amount_fen",
    )
    assert await ledger_events(p) == before
    still = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    assert still.status == "PENDING"
