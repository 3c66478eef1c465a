"""What `make fuzz` found, each pinned by a regression test (tests/fuzz/ is the fuzzer).

A ``google.protobuf.Timestamp`` decodes from any seconds and nanos, but protobuf's
``ToDatetime`` raises ``ValueError`` outside 0001..9999 or for nanos outside 0..999,999,999:
CreateSettlementBatch answered INTERNAL, ReconcileDiscountBill UNKNOWN (a streaming call),
with the exception in the message; later ProposeFunding answered INTERNAL for a tranche's
``releases_at``. Each is now INVALID_ARGUMENT naming the field, and the refusal changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text

from services.kernel import validate
from services.kernel.errors import InvalidArgument
from subsidy.v1 import ledger_pb2, risk_pb2, risk_pb2_grpc
from tests.e2e.conftest import Platform, status_of
from tests.support.callers import CallerRouter

NOT_TIMES = (
    Timestamp(seconds=0, nanos=-1),
    Timestamp(seconds=1_700_000_000, nanos=1_000_000_000),
    Timestamp(seconds=-(2**63) + 1),
    Timestamp(seconds=2**63 - 1),
)


def test_a_timestamp_outside_what_a_datetime_holds_is_the_callers_mistake() -> None:
    assert validate.timestamp("at", Timestamp(seconds=86_400)).isoformat() == (
        "1970-01-02T00:00:00+00:00"
    )
    for stamp in NOT_TIMES:
        with pytest.raises(InvalidArgument) as caught:
            validate.timestamp("at", stamp)
        assert (caught.value.reason, caught.value.field) == ("INVALID_TIME", "at")


async def ledger_events(p: Platform) -> int:
    async with p.running["ledger"].runtime.store.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM events")) or 0)


async def test_settlement_batch_period_that_is_no_time_is_invalid_argument(
    platform: Platform,
) -> None:
    before = await ledger_events(platform)
    for stamp in NOT_TIMES:
        for field in ("period_from", "period_to"):
            request = ledger_pb2.CreateSettlementBatchRequest(
                batch_id="sb-fuzz-1",
                merchant_id="m-fuzz",
                reason="fuzz",
                period_from=Timestamp(seconds=1_700_000_000),
                period_to=Timestamp(seconds=1_700_086_400),
            )
            getattr(request, field).CopyFrom(stamp)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await platform.ledger.CreateSettlementBatch(request)
            assert status_of(caught.value) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_TIME",
                field,
            )
    assert await ledger_events(platform) == before


async def test_funding_tranche_release_that_is_no_time_is_invalid_argument(
    platform: Platform,
) -> None:
    before = await ledger_events(platform)
    for stamp in NOT_TIMES:
        request = ledger_pb2.ProposeFundingRequest(
            pool_id="pool-fuzz", amount_fen=1_000, source="district", reason="fuzz"
        )
        request.tranches.add(amount_fen=1_000).releases_at.CopyFrom(stamp)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await platform.ledger.ProposeFunding(request)
        assert status_of(caught.value) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TIME",
            "tranches",
        ), caught.value.details()
    assert await ledger_events(platform) == before


async def test_discount_bill_period_that_is_no_time_is_invalid_argument(
    platform: Platform,
) -> None:
    before = await ledger_events(platform)

    async def header(field: str, stamp: Timestamp) -> AsyncIterator[ledger_pb2.DiscountBillChunk]:
        chunk = ledger_pb2.DiscountBillChunk(file_bytes=10, reason="fuzz")
        getattr(chunk, field).CopyFrom(stamp)
        yield chunk

    for stamp in NOT_TIMES:
        for field in ("period_from", "period_to"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in platform.ledger.ReconcileDiscountBill(header(field, stamp)):
                    pass
            assert status_of(caught.value) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_TIME",
                field,
            ), caught.value.details()
    assert await ledger_events(platform) == before


async def test_risk_list_expiry_that_is_no_time_is_invalid_argument(platform: Platform) -> None:
    router = CallerRouter(
        f"127.0.0.1:{platform.running['eligibility'].port}", platform.infra.identities
    )
    try:
        risk = risk_pb2_grpc.RiskServiceStub(router)
        for stamp in NOT_TIMES:
            request = risk_pb2.ProposeListChangeRequest(
                change="add", list="block", kind="merchant", value="m-fuzz", reason="fuzz"
            )
            request.expires_at.CopyFrom(stamp)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await risk.ProposeListChange(request)
            assert status_of(caught.value) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_TIME",
                "expires_at",
            )
    finally:
        await router.close()
