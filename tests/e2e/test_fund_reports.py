"""The fund-detail ledger and the bureau's daily report on the real stack: checkouts, a
cancellation, refunds (one of an order already settled: a clawback) and a tranche; the report
the ledger serves from its own store and the one rebuilt from the audit log's entries alone are
the same bytes, and a changed event in the log changes the rebuilt one."""

from __future__ import annotations

import datetime as dt
import io
import random
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import openpyxl
import pytest

from services.kernel.contract import dailyreport
from services.kernel.contract.dailyreport import DailyReport
from services.kernel.events import Envelope
from services.kernel.identity import Caller, Role
from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import ledger_pb2
from subsidyctl.cli.audit.replay import checked_envelopes
from subsidyctl.cli.report import rebuilt
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_funding_sources import PHONE_PRICE, budget, checkout, ledger_as
from tests.e2e.test_settlement import SUBSIDY, evidence, paid_order, period

CAPTURED = ev.SubsidyCaptured.DESCRIPTOR.full_name


def read(path: str) -> bytes:
    return Path(path).read_bytes()


async def campaign_day(p: Platform) -> tuple[dt.date, str]:
    """Today in the campaign's time zone, as the ledger reads it from the policy in force."""
    probe = await p.ledger.GetDailyReport(ledger_pb2.GetDailyReportRequest(date="2000-01-01"))
    return dt.datetime.now(ZoneInfo(probe.timezone)).date(), probe.timezone


async def both(
    p: Platform, day: dt.date
) -> tuple[ledger_pb2.DailyReport, DailyReport, list[Envelope]]:
    """The ledger's report of ``day`` and the one rebuilt from the audit log, once the log
    has every event (the log first: the ledger's can only have more)."""
    await p.quiesce()
    envelopes = [Envelope.FromString(d) for d in await checked_envelopes(p.audit)]
    log = rebuilt(envelopes, day, dt.datetime.now(dt.UTC))
    live = await p.ledger.GetDailyReport(ledger_pb2.GetDailyReportRequest(date=day.isoformat()))
    return live, log, envelopes


async def test_the_reports_rebuilt_from_the_log_are_the_ledgers_byte_for_byte(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    pool = await p.pool(rng, 1_000_000)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    matching = ledger_pb2.ProposeFundingRequest(
        pool_id=pool, amount_fen=1_000_000, source="platform-matching", reason="matching"
    )
    matching.tranches.add(amount_fen=1_000_000).releases_at.FromDatetime(soon)
    await p.fund(matching)

    async def released() -> None:
        assert (await budget(p, pool)).scheduled_fen == 0

    await eventually(released)  # the ledger's sweeper releases the tranche
    sku = await p.product(rng, "phone", 0, PHONE_PRICE)
    merchant = sku.replace("sku-", "m-")
    settled, refunded, kept = [await paid_order(p, pool, sku) for _ in range(3)]
    cancelled, _ = await checkout(p, pool, sku, "phone", PHONE_PRICE)
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=cancelled, reason="CANCELLED")
    )
    # The first order is settled, then refunded: the merchant owes it back (a clawback).
    await evidence(p, settled)
    create = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=f"sb-{rng.randrange(10**9)}", merchant_id=merchant, reason="today"
    )
    period(create)
    maker = ledger_as(p, Caller(Role.OPERATOR, "ops-a"))  # kept: a stub holds its channel
    checker = ledger_as(p, Caller(Role.APPROVER, "ops-b"))
    await maker.CreateSettlementBatch(create)
    await checker.ApproveSettlementBatch(
        ledger_pb2.ApproveSettlementBatchRequest(batch_id=create.batch_id, reason="ok")
    )
    for order in (settled, refunded):
        await p.ledger.ReleaseSubsidy(
            ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
        )

    # The fund-detail ledger: every kind of movement, each source's last balances GetBudget's.
    funds = await p.ledger.GetFundLedger(ledger_pb2.GetFundLedgerRequest(pool_id=pool))
    assert funds.total == len(funds.movements) and funds.next_start == 0
    kinds = [(m.kind, m.source) for m in funds.movements]
    assert ("FUNDED", "district") in kinds and ("SCHEDULED", "platform-matching") in kinds
    assert ("TRANCHE_RELEASED", "platform-matching") in kinds
    for kind in ("RESERVED", "CAPTURED", "RELEASED", "REFUNDED", "CLAWBACK"):
        assert {s for k, s in kinds if k == kind} == {"district", "platform-matching"}, kind
    clawed = [m for m in funds.movements if m.kind == "CLAWBACK"]
    assert {m.order_id for m in clawed} == {settled}
    assert sum(m.amount_fen for m in clawed) == SUBSIDY
    last = {m.source: m for m in funds.movements}
    b = await budget(p, pool)
    assert {
        s.source: (s.funded_fen, s.available_fen, s.reserved_fen, s.spent_fen) for s in b.sources
    } == {
        name: (m.funded_fen, m.available_fen, m.reserved_fen, m.spent_fen)
        for name, m in last.items()
    }
    page = await p.ledger.GetFundLedger(
        ledger_pb2.GetFundLedgerRequest(pool_id=pool, source="district", start=1, limit=2)
    )
    district = [m for m in funds.movements if m.source == "district"]
    assert list(page.movements) == district[1:3] and page.next_start == 3

    # The daily report: the ledger's and the log's are the same bytes.
    day, zone = await campaign_day(p)
    live, log, envelopes = await both(p, day)
    assert (live.date, live.timezone, log.day.timezone) == (day.isoformat(), zone, zone)
    assert live.csv == log.csv()
    assert live.xlsx == log.xlsx()
    mine = [x for x in log.lines if x.section == dailyreport.SOURCE and x.pool_id == pool]
    assert sum(x.subsidy_fen for x in mine) == 3 * SUBSIDY
    assert sum(x.refunded_fen for x in mine) == 2 * SUBSIDY
    assert sum(x.clawback_fen for x in mine) == SUBSIDY
    (left,) = [
        x for x in log.lines if x.section == dailyreport.POOL_REMAINING and x.pool_id == pool
    ]
    assert (left.funded_fen, left.available_fen, left.spent_fen) == (
        b.funded_fen,
        b.available_fen,
        b.spent_fen,
    )
    sheet = openpyxl.load_workbook(io.BytesIO(live.xlsx)).active
    assert sheet is not None
    assert [
        tuple("" if v is None else v for v in r) for r in sheet.iter_rows(values_only=True)
    ] == [
        dailyreport.HEADERS,
        *log.rows(),
    ]

    # A changed event in the log (the kept order's capture booked to another category) changes
    # the rebuilt report: the comparison can fail.
    (i,) = [
        i
        for i, e in enumerate(envelopes)
        if e.event_type == CAPTURED and ev.SubsidyCaptured.FromString(e.payload).order_id == kept
    ]
    captured = ev.SubsidyCaptured.FromString(envelopes[i].payload)
    captured.category = "tv"
    forged = Envelope()
    forged.CopyFrom(envelopes[i])
    forged.payload = captured.SerializeToString()
    tampered = [*envelopes[:i], forged, *envelopes[i + 1 :]]
    changed = rebuilt(tampered, day, dt.datetime.now(dt.UTC))
    assert changed.csv() != live.csv and changed.xlsx() != live.xlsx

    # The CLI: the auditor rebuilds it from the log and compares; the operator's is the ledger's.
    auditor = identity_dir(p.infra.identities(Caller(Role.AUDITOR, "au-zhao")), tmp_path / "au")
    operator = identity_dir(p.infra.identities(Caller(Role.OPERATOR, "op-li")), tmp_path / "op")
    where = (
        "--ledger",
        f"127.0.0.1:{p.running['ledger'].port}",
        "--audit",
        f"127.0.0.1:{p.running['audit'].port}",
    )
    await p.quiesce()
    args = ("report", "daily", "--date", day.isoformat(), *where)
    out = tmp_path / "rebuilt"
    code, answer, err = await subsidyctl(
        *args, "--from-events", "--out", str(out), "--json", identity=auditor
    )
    assert code == 0, err
    assert (answer["from"], answer["matches_live"], answer["timezone"]) == ("audit log", True, zone)
    assert answer["totals"]["subsidy_fen"] >= 3 * SUBSIDY
    assert answer["remaining"][pool]["available_fen"] == b.available_fen
    rebuilt_csv = read(answer["csv"])
    code, ledgers, err = await subsidyctl(*args, "--out", str(tmp_path / "live"), identity=operator)
    assert code == 0, err
    assert ledgers["from"] == "ledger"
    assert read(ledgers["csv"]) == rebuilt_csv
    assert read(ledgers["xlsx"]) == read(answer["xlsx"])
    code, listed, err = await subsidyctl(
        "ledger",
        "funds",
        "--pool",
        pool,
        "--source",
        "district",
        "--json",
        *where[:2],
        identity=operator,
    )
    assert code == 0, err
    assert [m["event_id"] for m in listed["movements"]] == [m.event_id for m in district]
    assert listed["movements"][-1]["available_fen"] == district[-1].available_fen


async def test_a_platform_may_not_read_the_fund_reports(platform: Platform) -> None:
    platform_caller = ledger_as(platform, Caller(Role.PLATFORM, "jd"))
    for call in (
        platform_caller.GetFundLedger(ledger_pb2.GetFundLedgerRequest()),
        platform_caller.GetDailyReport(ledger_pb2.GetDailyReportRequest(date="2025-06-01")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert status_of(err.value)[0] == grpc.StatusCode.PERMISSION_DENIED


async def test_the_next_read_has_the_movements_made_since(
    platform: Platform, rng: random.Random
) -> None:
    """The rows the ledger keeps between calls are never older than its store."""
    p = platform
    pool = await p.pool(rng, 100_000)
    request = ledger_pb2.GetFundLedgerRequest(pool_id=pool)
    first = await p.ledger.GetFundLedger(request)
    assert [m.kind for m in first.movements] == ["FUNDED"]
    assert (await p.ledger.GetFundLedger(request)) == first  # kept, and the same
    order = await paid_order(p, pool, await p.product(rng, "phone", 0, PHONE_PRICE))
    after = await p.ledger.GetFundLedger(request)
    assert [(m.kind, m.order_id, m.amount_fen) for m in after.movements[1:]] == [
        ("RESERVED", order, SUBSIDY),
        ("CAPTURED", order, SUBSIDY),
    ]
    assert after.movements[-1].spent_fen == SUBSIDY
