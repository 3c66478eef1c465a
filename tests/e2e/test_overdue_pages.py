"""ListOverdueEvidence in pages on the real stack: a page token after the last capture examined,
so every overdue capture is listed once over the pages, and one call scans a bounded number of
captures (a page may be short of its limit and still have a next one)."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator

import grpc
import pytest

from services.ledger import settlement
from services.ledger.handlers import Ledger
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_funding_sources import PHONE_PRICE
from tests.e2e.test_settlement import evidence, paid_order


@pytest.fixture
def ledger(platform: Platform) -> Iterator[Ledger]:
    found: Ledger = platform.running["ledger"].wiring.registrations[0][1].ledger
    real = found.clock
    yield found
    found.clock = real


async def pages(p: Platform, merchant: str, limit: int) -> list[list[str]]:
    """Every page of the merchant's overdue captures, following the tokens to the end."""
    out: list[list[str]] = []
    token = ""
    for _ in range(50):
        answer = await p.ledger.ListOverdueEvidence(
            ledger_pb2.ListOverdueEvidenceRequest(
                merchant_id=merchant, limit=limit, page_token=token
            )
        )
        out.append([c.order_id for c in answer.captures])
        token = answer.next_page_token
        if not token:
            return out
    raise AssertionError("the pages never ended")


async def test_overdue_captures_are_listed_once_over_pages_of_any_size(
    platform: Platform, rng: random.Random, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = platform
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    orders = [await paid_order(p, pool, sku) for _ in range(5)]
    await evidence(p, orders[2])
    late = [o for o in orders if o != orders[2]]  # in capture order
    real = ledger.clock
    ledger.clock = lambda: real() + dt.timedelta(days=31)
    assert await pages(p, merchant, 2) == [late[:2], late[2:]]
    assert await pages(p, merchant, 3) == [late[:3], late[3:]]
    assert await pages(p, merchant, 100) == [late]

    # One call scans a bounded number of captures: with a scan of 2 read 1 at a time, pages
    # come back short but with a token, and together they are still every overdue capture.
    monkeypatch.setattr(settlement, "OVERDUE_SCAN", 2)
    monkeypatch.setattr(settlement, "OVERDUE_CHUNK", 1)
    listed = await pages(p, merchant, 100)
    assert len(listed) > 1 and [o for page in listed for o in page] == late
    # Younger than the policy's 30 days: the scan moves on page by page, and lists none.
    ledger.clock = lambda: real() + dt.timedelta(days=10)
    listed = await pages(p, merchant, 100)
    assert len(listed) > 1 and all(page == [] for page in listed)


async def test_a_page_token_not_from_the_ledger_is_refused(platform: Platform) -> None:
    for bad in ("x", "123", "~o-1", "1~", "9" * 19 + "~o-1"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await platform.ledger.ListOverdueEvidence(
                ledger_pb2.ListOverdueEvidenceRequest(page_token=bad)
            )
        assert status_of(err.value) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        )
