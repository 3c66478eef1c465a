"""The edge of the fund-detail ledger and the daily report (part of
:class:`services.ledger.api.LedgerApi`): the request's fields validated once, the rows and
files on the wire."""

from __future__ import annotations

import datetime as dt
from functools import cached_property
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.kernel import validate
from services.kernel.contract.dailyreport import DailyReport, Line
from services.kernel.contract.fundledger import Movement, select
from services.kernel.errors import InvalidArgument
from services.kernel.rpc import ServicerContext
from subsidy.v1 import ledger_pb2

from .fundreports import FundReports
from .handlers import Ledger

DEFAULT_ROWS: Final = 1000
MAX_ROWS: Final = 10_000


def movement(m: Movement) -> ledger_pb2.FundMovement:
    """One row of the fund-detail ledger on the wire."""
    out = ledger_pb2.FundMovement(
        pool_id=m.pool_id,
        stream_version=m.stream_version,
        source=m.source,
        kind=m.kind,
        amount_fen=m.amount_fen,
        order_id=m.order_id,
        category=m.category,
        reason=m.reason,
        event_id=m.event_id,
        funded_fen=m.funded_fen,
        scheduled_fen=m.scheduled_fen,
        available_fen=m.available_fen,
        reserved_fen=m.reserved_fen,
        spent_fen=m.spent_fen,
    )
    out.occurred_at.FromJsonString(m.occurred_at)
    return out


def line(x: Line) -> ledger_pb2.DailyReportLine:
    """One line of the daily report on the wire."""
    return ledger_pb2.DailyReportLine(
        section=x.section,
        pool_id=x.pool_id,
        source=x.source,
        category=x.category,
        orders=x.orders,
        subsidy_fen=x.subsidy_fen,
        refunds=x.refunds,
        refunded_fen=x.refunded_fen,
        clawbacks=x.clawbacks,
        clawback_fen=x.clawback_fen,
        funded_fen=x.funded_fen,
        scheduled_fen=x.scheduled_fen,
        available_fen=x.available_fen,
        reserved_fen=x.reserved_fen,
        spent_fen=x.spent_fen,
    )


def report_message(report: DailyReport) -> ledger_pb2.DailyReport:
    """The daily report on the wire: its lines and both files."""
    return ledger_pb2.DailyReport(
        date=report.day.date.isoformat(),
        timezone=report.day.timezone,
        lines=[line(x) for x in report.lines],
        csv=report.csv(),
        xlsx=report.xlsx(),
    )


def _date(value: str) -> dt.date:
    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value)
    except ValueError:
        pass
    raise InvalidArgument("INVALID_DATE", "date: a day as YYYY-MM-DD", field="date")


def _timezone(value: str) -> str:
    if not value:
        return ""
    try:
        if len(value) <= 64:
            ZoneInfo(value)
            return value
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise InvalidArgument("INVALID_TIMEZONE", "timezone: an IANA time zone", field="timezone")


class FundReportsApi:
    """GetFundLedger and GetDailyReport."""

    ledger: Ledger

    @cached_property
    def fund_reports(self) -> FundReports:
        return FundReports(self.ledger.store, self.ledger.catalog)

    async def GetFundLedger(
        self, request: ledger_pb2.GetFundLedgerRequest, context: ServicerContext
    ) -> ledger_pb2.FundLedger:
        pool_id = validate.identifier("pool_id", request.pool_id) if request.pool_id else ""
        source = (
            validate.text_field("source", request.source, max_len=64, required=False)
            if request.HasField("source")
            else None
        )
        limit = request.limit or DEFAULT_ROWS
        if not 0 < limit <= MAX_ROWS:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_ROWS}", field="limit")
        if request.start < 0:
            raise InvalidArgument("INVALID_START", "start: 0 or more", field="start")
        rows = select(await self.fund_reports.movements(), pool_id, source)
        page = rows[request.start : request.start + limit]
        following = request.start + len(page)
        return ledger_pb2.FundLedger(
            movements=[movement(m) for m in page],
            total=len(rows),
            next_start=following if following < len(rows) else 0,
        )

    async def GetDailyReport(
        self, request: ledger_pb2.GetDailyReportRequest, context: ServicerContext
    ) -> ledger_pb2.DailyReport:
        date, timezone = _date(request.date), _timezone(request.timezone)
        return report_message(await self.fund_reports.daily(date, timezone))
