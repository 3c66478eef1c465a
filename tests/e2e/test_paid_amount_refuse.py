"""The policy's ``funding.paid_amount: refuse`` on the real stack.

A policy version that refuses is published through catalog (drafted by an operator, approved by
another person) in force only from 2150 onwards, so the rest of the session keeps the session's
policy (which flags); catalog's clock is moved into it while the orders are reserved, so their
policy version is the refusing one, and the ledger judges their captures by it. A capture whose
paid amount is wrong or absent is refused with nothing changed; the right amount is captured.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from services.catalog.handlers import Catalog
from services.kernel import rpc
from services.kernel.contract.policy import policy_to_dict
from services.kernel.identity import Caller, Role
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc, ledger_pb2
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_funding_sources import PHONE_PRICE, budget, checkout, ledger_events

SUBSIDY = 45_000  # 15 % of PHONE_PRICE
FAILED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def catalog(platform: Platform) -> Iterator[Catalog]:
    found: Catalog = platform.running["catalog"].wiring.registrations[0][1].catalog
    real = found.now
    yield found
    found.now = real


def catalog_as(p: Platform, who: Caller) -> catalog_pb2_grpc.CatalogServiceAsyncStub:
    channel = rpc.channel(f"127.0.0.1:{p.running['catalog'].port}", p.infra.identities(who))
    return catalog_pb2_grpc.CatalogServiceStub(channel)


async def publish_from_2150(
    p: Platform, catalog: Catalog, rng: random.Random, reason: str, **changes: Any
) -> datetime:
    """The session's rules with ``changes``, published through catalog (maker, then another
    person approves), in force from a day of 2150-2158 (after every other test's future
    versions); returns that day."""
    effective = datetime(2150, 1, 1, tzinfo=UTC) + timedelta(days=rng.randrange(3000))
    document = policy_to_dict(catalog.policy()) | changes
    document["version"] = f"from-2150-{rng.randrange(10**9)}"
    document["effective_from"] = effective.isoformat()
    maker = catalog_as(p, Caller(Role.OPERATOR, "ops-a"))
    checker = catalog_as(p, Caller(Role.APPROVER, "ops-b"))
    await maker.DraftPolicy(
        catalog_pb2.DraftPolicyRequest(
            document=json.dumps(document, ensure_ascii=False), reason=reason
        )
    )
    approved = await checker.ApprovePolicy(
        catalog_pb2.ApprovePolicyRequest(version=document["version"], reason="ok")
    )
    assert (approved.status, approved.in_force) == ("APPROVED", False)
    return effective


async def publish_refusing(p: Platform, catalog: Catalog, rng: random.Random) -> datetime:
    """The session's rules with ``funding.paid_amount: refuse``, in force from 2150 on."""
    funding = policy_to_dict(catalog.policy()).get("funding", {})
    return await publish_from_2150(
        p, catalog, rng, "refuse wrong paid amounts", funding={**funding, "paid_amount": "refuse"}
    )


async def test_a_refusing_policy_refuses_a_wrong_or_missing_paid_amount_and_changes_nothing(
    platform: Platform, rng: random.Random, catalog: Catalog
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    effective = await publish_refusing(p, catalog, rng)
    real = catalog.now
    catalog.now = lambda: effective + timedelta(hours=12)  # a day the refusing version rules
    try:
        order, _ = await checkout(p, pool, sku, "phone", PHONE_PRICE)
    finally:
        catalog.now = real
    held = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    assert held.policy_version.startswith("from-2150-") and held.status == "PENDING"

    def capture(paid: int | None) -> ledger_pb2.CaptureSubsidyRequest:
        request = ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=f"pay-{order}")
        if paid is not None:
            request.paid_amount_fen = paid
        return request

    before = (await ledger_events(p), await budget(p, pool))
    for paid, reason in (
        (PHONE_PRICE, "PAID_AMOUNT_MISMATCH"),  # the subsidy not deducted
        (PHONE_PRICE - SUBSIDY - 1, "PAID_AMOUNT_MISMATCH"),
        (None, "PAID_AMOUNT_MISSING"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.ledger.CaptureSubsidy(capture(paid))
        assert status_of(err.value) == (FAILED, reason, "paid_amount_fen")
    assert (await ledger_events(p), await budget(p, pool)) == before
    still = await p.ledger.GetReservation(ledger_pb2.GetReservationRequest(order_id=order))
    assert (still.status, still.payment_ref, still.HasField("paid_amount_fen")) == (
        "PENDING",
        "",
        False,
    )

    captured = await p.ledger.CaptureSubsidy(capture(PHONE_PRICE - SUBSIDY))
    assert (captured.status, captured.paid_amount_fen, captured.capture_flag) == (
        "CAPTURED",
        PHONE_PRICE - SUBSIDY,
        "",
    )
    after = await budget(p, pool)
    assert (after.spent_fen, after.reserved_fen) == (
        before[1].spent_fen + SUBSIDY,
        before[1].reserved_fen - SUBSIDY,
    )


async def test_the_session_policy_still_flags_rather_than_refuses(
    platform: Platform, rng: random.Random
) -> None:
    """The refusing version is in force only in 2150: an order of today is flagged, not
    refused (the session's policy)."""
    p = platform
    pool = await p.pool(rng, 1_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    order, _ = await checkout(p, pool, sku, "phone", PHONE_PRICE)
    flagged = await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="x", paid_amount_fen=1)
    )
    assert (flagged.status, flagged.capture_flag) == ("CAPTURED", "PAID_AMOUNT_MISMATCH")
