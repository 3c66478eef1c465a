"""The bureau's daily report (定期回传), live from the ledger or rebuilt from the audit log.

  subsidyctl report daily --date YYYY-MM-DD [--out DIR] [--from-events]

Writes ``daily-report-DATE.csv`` and ``daily-report-DATE.xlsx`` (formula-safe, the same rows,
no wall-clock time inside: the same events give the same bytes) and prints one JSON object:
the day, the campaign's time zone, the files and their SHA-256, the day's totals and the money
left in each pool. By default the report is the ledger's (``GetDailyReport``, from its own
events). ``--from-events`` rebuilds it from the audit log's entries alone, as ``audit verify``
fetches them (every entry's leaf recomputed and the tree's root matched with a fresh
checkpoint; ``audit verify`` also checks the checkpoint's signature), in the time zone of the
policy in force by the log's own ``PolicyPublished`` events, writes the rebuilt files, and
compares their bytes with the ledger's: ``matches_live`` says whether they are identical, and
the exit code is 1 when they are not. docs/audit.md, "The fund-detail ledger and the daily
report".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from services.kernel import rpc, tls
from services.kernel.contract import dailyreport
from services.kernel.contract.dailyreport import DailyReport, Day
from services.kernel.events import Envelope
from subsidy.v1 import audit_pb2_grpc, ledger_pb2, ledger_pb2_grpc

from ..stack.certs import AUDITOR_DEMO, OPERATOR_DEMO
from .audit.replay import checked_envelopes
from .budget import LedgerOpt
from .common import EXIT_NO, Failure, JsonOpt, OperatorIdentityOpt, emit, identity, local_address

app = typer.Typer(
    name="report",
    help="The bureau's daily report, from the ledger or rebuilt from the audit log.",
    no_args_is_help=True,
)
AuditAddrOpt = Annotated[
    str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
]


def rebuilt(envelopes: list[Envelope], date: dt.date, now: dt.datetime) -> DailyReport:
    """The report of ``date`` from the log's events alone (the time zone of the policy the
    log's PolicyPublished events have in force at ``now``)."""
    return dailyreport.from_events(
        envelopes, Day(date, dailyreport.campaign_timezone(envelopes, now))
    )


def summary(date: str, timezone: str, lines: list[dailyreport.Line]) -> dict[str, Any]:
    """The day's totals and each pool's money at its end, as the JSON summary shows them."""
    total = next(x for x in lines if x.section == dailyreport.TOTAL)
    return {
        "date": date,
        "timezone": timezone,
        "totals": {f: getattr(total, f) for f in dailyreport.FLOWS},
        "remaining": {
            x.pool_id: {b: getattr(x, b) for b in dailyreport.BALANCES}
            for x in lines
            if x.section == dailyreport.POOL_REMAINING
        },
    }


def lines_of(message: ledger_pb2.DailyReport) -> list[dailyreport.Line]:
    """The ledger's lines as the fold's."""
    return [
        dailyreport.Line(x.section, x.pool_id, x.source, x.category).having(
            {f: getattr(x, f) for f in (*dailyreport.FLOWS, *dailyreport.BALANCES)}
        )
        for x in message.lines
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise Failure(f"--date {text!r}: a day as YYYY-MM-DD") from None


@app.command()
def daily(
    date: Annotated[str, typer.Option("--date", help="the campaign's day, YYYY-MM-DD")],
    out: Annotated[Path, typer.Option(help="directory for the CSV and XLSX files")] = Path(),
    from_events: Annotated[
        bool,
        typer.Option(
            "--from-events",
            help="rebuild it from the audit log's events alone and compare with the ledger's",
        ),
    ] = False,
    ledger: LedgerOpt = "",
    audit: AuditAddrOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Write one day's report (CSV and XLSX) and print its totals as JSON."""
    day = _date(date)
    who = identity(identity_dir, AUDITOR_DEMO if from_events else OPERATOR_DEMO)
    live, log = asyncio.run(_fetch(who, day, ledger, audit, from_events))
    name = f"daily-report-{day.isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    csv_path, xlsx_path = out / f"{name}.csv", out / f"{name}.xlsx"
    answer: dict[str, Any]
    if log is None:
        csv, xlsx = live.csv, live.xlsx
        answer = summary(live.date, live.timezone, lines_of(live)) | {"from": "ledger"}
    else:
        csv, xlsx = log.csv(), log.xlsx()
        answer = summary(date, log.day.timezone, list(log.lines)) | {"from": "audit log"}
        answer["matches_live"] = (csv, xlsx) == (live.csv, live.xlsx)
        answer["live"] = {"csv_sha256": _sha(live.csv), "xlsx_sha256": _sha(live.xlsx)}
    csv_path.write_bytes(csv)
    xlsx_path.write_bytes(xlsx)
    answer |= {
        "csv": str(csv_path),
        "xlsx": str(xlsx_path),
        "csv_sha256": _sha(csv),
        "xlsx_sha256": _sha(xlsx),
    }
    emit(answer)
    if answer.get("matches_live") is False:
        raise typer.Exit(EXIT_NO)


async def _fetch(
    who: tls.CertificateSource, day: dt.date, ledger: str, audit: str, from_events: bool
) -> tuple[ledger_pb2.DailyReport, DailyReport | None]:
    """The ledger's report and, with ``from_events``, the one rebuilt from the log (fetched
    first, so the ledger's covers at least every event the log had)."""
    ledger_ch = rpc.channel(ledger or local_address("ledger"), who, deadline_s=60)
    audit_ch = (
        rpc.channel(audit or local_address("audit"), who, deadline_s=60) if from_events else None
    )
    try:
        log = None
        if audit_ch is not None:
            data = await checked_envelopes(audit_pb2_grpc.AuditServiceStub(audit_ch))
            envelopes = [Envelope.FromString(d) for d in data]
            log = rebuilt(envelopes, day, dt.datetime.now(dt.UTC))
        request = ledger_pb2.GetDailyReportRequest(date=day.isoformat())
        live = await ledger_pb2_grpc.LedgerServiceStub(ledger_ch).GetDailyReport(request)
        return live, log
    finally:
        await ledger_ch.close()
        if audit_ch is not None:
            await audit_ch.close()
