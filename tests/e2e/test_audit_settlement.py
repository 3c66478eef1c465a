"""The auditor's replay of settlement on the real stack: ``audit verify`` rebuilds every
settlement batch and the returns ledger from the events alone and compares them with the
ledger's (``ListSettlementBatches``, ``ListReturns``, every page); a batch or a refund the
ledger reports differently is a difference naming the batch or order and the figure."""

from __future__ import annotations

import random
from pathlib import Path

from services.kernel.identity import Caller, Role
from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform
from tests.e2e.test_audit_crosscheck import run_cli
from tests.e2e.test_audit_tamper import database, of, settled
from tests.e2e.test_funding_sources import PHONE_PRICE, ledger_as
from tests.e2e.test_settlement import SUBSIDY, evidence, paid_order, period


async def settle(p: Platform, rng: random.Random) -> tuple[str, str, str, str, str]:
    """A merchant with a paid batch of two orders, one of them then refunded (a clawback), and
    a second batch that deducts it; returns (merchant, first batch, second, refunded, kept)."""
    pool = await p.pool(rng, 10_000_000)
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    kept, returned, later = [await paid_order(p, pool, sku) for _ in range(3)]
    for order in (kept, returned):
        await evidence(p, order)
    maker = ledger_as(p, Caller(Role.OPERATOR, "ops-a"))
    checker = ledger_as(p, Caller(Role.APPROVER, "ops-b"))
    batches = []
    for _ in range(2):
        request = ledger_pb2.CreateSettlementBatchRequest(
            batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant
        )
        period(request)
        batches.append(await maker.CreateSettlementBatch(request))
        if len(batches) == 2:
            break
        batch_id = request.batch_id
        await checker.ApproveSettlementBatch(
            ledger_pb2.ApproveSettlementBatchRequest(batch_id=batch_id)
        )
        await maker.MarkSettlementBatchPaid(
            ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=batch_id, payment_ref="x-1")
        )
        await p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=returned, reason="REFUNDED")
        )
        await evidence(p, later)
    first, second = batches
    assert [c.order_id for c in second.clawbacks] == [returned]
    return merchant, first.batch_id, second.batch_id, returned, kept


async def test_batches_and_returns_rebuilt_from_the_log_match_the_ledger_and_a_change_is_named(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    merchant, first, second, returned, kept = await settle(platform, rng)
    await settled(platform)
    code, answer, err = await run_cli(platform, tmp_path)
    assert code == 0, (answer["differences"], err)
    # Each batch is one row, each order it pays and each clawback it deducts one more.
    assert answer["totals_compared"]["settlement"] >= 2 + 3 + 1
    assert answer["totals_compared"]["returns"] >= 1

    async with database(platform, "ledger") as conn:
        try:
            await conn.execute(
                "UPDATE settlement_batches SET net_fen = %s WHERE batch_id = %s",
                (2 * SUBSIDY + 1, first),
            )
            await conn.execute(
                "UPDATE clawbacks SET deducted_by = '' WHERE order_id = %s", (returned,)
            )
            code, answer, _ = await run_cli(platform, tmp_path)
        finally:  # put back what was changed (the session's platform is shared)
            await conn.execute(
                "UPDATE settlement_batches SET net_fen = %s WHERE batch_id = %s",
                (2 * SUBSIDY, first),
            )
            await conn.execute(
                "UPDATE clawbacks SET deducted_by = %s WHERE order_id = %s", (second, returned)
            )
    assert code == 1 and answer["ok"] is False
    found = {
        (d["total"], tuple(d["key"]), d["figure"]): (d["log"], d["live"])
        for d in answer["differences"]
        if d["check"] == "totals"
    }
    batch = await platform.ledger.GetSettlementBatch(
        ledger_pb2.GetSettlementBatchRequest(batch_id=first)
    )
    [refund] = (
        await platform.ledger.ListReturns(ledger_pb2.ListReturnsRequest(merchant_id=merchant))
    ).returns
    head = (first, merchant, batch.period_from.ToJsonString(), batch.period_to.ToJsonString())
    row = (returned, merchant, refund.platform_id, refund.sku, first)
    assert found == {
        # the batch's net: one fen more by the ledger than its events say
        ("settlement", head, "net_fen"): (2 * SUBSIDY, 2 * SUBSIDY + 1),
        # the refund: its clawback deducted by the second batch by the log, still outstanding
        # by the ledger (two rows, one on each side)
        ("returns", (*row, second), "subsidy_fen"): (SUBSIDY, None),
        ("returns", (*row, second), "clawed_back"): (1, None),
        ("returns", (*row, "-"), "subsidy_fen"): (None, SUBSIDY),
        ("returns", (*row, "-"), "clawed_back"): (None, 1),
    }
    assert answer["signature_ok"] is True and answer["cross_check_ok"] is True
    assert of(answer, "tree") == [] and kept


async def test_settlement_batches_are_listed_page_by_page(
    platform: Platform, rng: random.Random
) -> None:
    merchant, first, second, returned, _ = await settle(platform, rng)
    listed, cursor = [], ""
    while True:
        page = await platform.ledger.ListSettlementBatches(
            ledger_pb2.ListSettlementBatchesRequest(merchant_id=merchant, cursor=cursor, limit=1)
        )
        listed += [b.batch_id for b in page.batches]
        if not (cursor := page.next_cursor):
            break
    assert listed == sorted([first, second])
    got = await platform.ledger.GetSettlementBatch(
        ledger_pb2.GetSettlementBatchRequest(batch_id=first)
    )
    every = await platform.ledger.ListSettlementBatches(
        ledger_pb2.ListSettlementBatchesRequest(merchant_id=merchant)
    )
    assert every.batches[[b.batch_id for b in every.batches].index(first)] == got
    assert every.next_cursor == ""
    returns = await platform.ledger.ListReturns(
        ledger_pb2.ListReturnsRequest(merchant_id=merchant, limit=1)
    )
    assert [r.order_id for r in returns.returns] == [returned] and returns.next_cursor
    rest = await platform.ledger.ListReturns(
        ledger_pb2.ListReturnsRequest(merchant_id=merchant, limit=1, cursor=returns.next_cursor)
    )
    assert list(rest.returns) == [] and rest.next_cursor == ""
