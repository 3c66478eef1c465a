"""Discount-bill reconciliation (立减账单核对) against a running ledger service.

  subsidyctl reconcile FILE.csv [--from ISO --to ISO] [--platform ID] [--report PREFIX]
                                [--reason TEXT]
  subsidyctl reconciliations [FILE_SHA256] [--report PREFIX] [--limit N]

``reconcile`` sends the payment provider's bill (UTF-8 CSV, header
``order_id,payment_ref,discount_fen,paid_at``) to the ledger in chunks of 1 MiB, shows the
progress on stderr (a Rich bar on a terminal, a line per phase and quarter otherwise), writes
the report's lines as PREFIX.csv and PREFIX.xlsx (default ``reconciliation-<sha256[:12]>``),
and prints one JSON object: the counts and fen of each kind, ``bill_total_fen`` and
``ledger_total_fen``. The same file again records nothing and prints the same answer
(``already_reconciled: true``). Exit 0 when the bill and the ledger agree, 1 when they do not or
the bill has malformed rows (then nothing is recorded: the rows are listed), 2 refused, 3 no
answer in time. As the demo operator unless ``--identity``.

``reconciliations`` lists the recorded reconciliations (one JSON object per line, newest
first), or with a SHA-256 prints that one as ``reconcile`` did (and writes its report with
``--report``). As the demo auditor unless ``--identity``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table

from services.kernel import rpc, tls
from services.kernel.contract.spreadsheet import csv_bytes, xlsx_bytes
from subsidy.v1 import events_pb2, ledger_pb2, ledger_pb2_grpc

from ..stack.certs import AUDITOR_DEMO, OPERATOR_DEMO
from .common import (
    EXIT_NO,
    EXIT_OK,
    EXIT_UNREACHABLE,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    emit,
    identity,
    local_address,
    note,
    stderr_console,
)
from .progress import PhaseProgress

T = TypeVar("T")
app = typer.Typer()
PANEL = "Ledger"
CHUNK: Final = 1024 * 1024  # the ledger takes at most 1 MiB a chunk
LedgerOpt = Annotated[
    str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
]
ReportOpt = Annotated[
    str,
    typer.Option(
        help="write the report as PREFIX.csv and PREFIX.xlsx"
        " (default: reconciliation-<first 12 of the file's SHA-256>)",
        show_default=False,
    ),
]
TimeoutOpt = Annotated[float, typer.Option(help="seconds", min=0.0)]

# The recorded kinds, as the JSON names them, and where the event keeps each.
KINDS: Final = (
    ("matched", "MATCHED"),
    ("amount_mismatch", "AMOUNT_MISMATCH"),
    ("missing_in_ledger", "MISSING_IN_LEDGER"),
    ("missing_in_bill", "MISSING_IN_BILL"),
    ("payment_ref_mismatch", "PAYMENT_REF_MISMATCH"),
    ("refunded_in_bill", "REFUNDED_IN_BILL"),
    ("duplicate", "DUPLICATE"),
)
KIND_ZH: Final = {
    "MATCHED": "一致",
    "AMOUNT_MISMATCH": "金额不符",
    "MISSING_IN_LEDGER": "台账缺失",
    "MISSING_IN_BILL": "账单缺失",
    "PAYMENT_REF_MISMATCH": "支付单号不符",
    "REFUNDED_IN_BILL": "已退款仍在账单",
    "DUPLICATE": "账单重复",
}
REPORT_HEADERS: Final = (
    "差异类型 kind",
    "账单行号 line",
    "订单号 order_id",
    "账单支付单号 bill_payment_ref",
    "台账支付单号 ledger_payment_ref",
    "账单立减(分) bill_fen",
    "台账应付(分) ledger_fen",
    "差额(分) difference_fen",
    "支付时间 paid_at",
    "核销时间 captured_at",
    "台账状态 ledger_status",
    "首次出现行 first_line",
)
SUMMARY_HEADERS: Final = ("类型 kind", "笔数 count", "账单(分) bill_fen", "台账(分) ledger_fen")


def parse_time(value: str) -> datetime | None:
    """An ISO 8601 time with its offset, e.g. 2025-06-01T00:00:00+08:00 ("" for none)."""
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise typer.BadParameter(
            "an ISO 8601 time with its UTC offset, e.g. 2025-06-01T00:00+08:00"
        )
    return at


def ledger_call(
    address: str,
    who: tls.CertificateSource,
    call: Callable[[ledger_pb2_grpc.LedgerServiceAsyncStub], Awaitable[T]],
    deadline_s: float,
) -> T:
    """Run ``call`` as ``who`` against the ledger (a failure propagates; cli.main prints it)."""

    async def go() -> T:
        channel = rpc.channel(address or local_address("ledger"), who, deadline_s=deadline_s)
        try:
            return await call(ledger_pb2_grpc.LedgerServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(go())


def bill_header(
    start: datetime | None = None,
    end: datetime | None = None,
    reason: str = "",
    platform_id: str = "",
) -> ledger_pb2.DiscountBillChunk:
    """The header of a bill: its period (both ends, or neither), why, and whose bill it is."""
    header = ledger_pb2.DiscountBillChunk(reason=reason, platform_id=platform_id)
    if start is not None:
        header.period_from.FromDatetime(start.astimezone(UTC))
    if end is not None:
        header.period_to.FromDatetime(end.astimezone(UTC))
    return header


async def send_bill(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    data: bytes,
    header: ledger_pb2.DiscountBillChunk,
    *,
    chunk: int = CHUNK,
    deadline_s: float = 600.0,
    sent: Callable[[int], None] | None = None,
) -> AsyncIterator[ledger_pb2.ReconcileProgress]:
    """ReconcileDiscountBill as the ledger expects it: ``header`` (:func:`bill_header`, its
    size set here) on READY, the bytes in chunks on RECEIVE (``sent`` is told how many bytes
    went so far); yields every reply.

    Writing only after each go-ahead means a refusal (a role that may not reconcile, a bill
    too large, a bad period) arrives as itself: grpc's client can report INTERNAL instead when
    it is still writing as the server refuses."""
    ready, accepted = asyncio.Event(), asyncio.Event()

    async def requests() -> AsyncIterator[ledger_pb2.DiscountBillChunk]:
        await ready.wait()
        if call.done():
            return
        sized = ledger_pb2.DiscountBillChunk()
        sized.CopyFrom(header)
        sized.file_bytes = len(data)
        yield sized
        await accepted.wait()
        for at in range(0, len(data), chunk):
            if call.done():
                return
            yield ledger_pb2.DiscountBillChunk(data=data[at : at + chunk])
            if sent is not None:
                sent(min(at + chunk, len(data)))

    call = stub.ReconcileDiscountBill(requests(), timeout=deadline_s)
    try:
        async for reply in call:
            if reply.phase == "READY":
                ready.set()
            elif reply.phase == "RECEIVE":
                accepted.set()
            yield reply
    finally:
        ready.set()  # a refused call: the request stream ends instead of waiting
        accepted.set()


@dataclass
class Answer:
    """What the ledger answered: the reconciliation and its report's lines, or the bad rows."""

    file_sha256: str = ""
    lines: list[ledger_pb2.BillDiscrepancy] = field(default_factory=list)
    done: ledger_pb2.ReconcileProgress | None = None


async def collect(
    replies: AsyncIterable[ledger_pb2.ReconcileProgress], bar: PhaseProgress
) -> Answer:
    answer = Answer()
    async for p in replies:
        answer.file_sha256 = p.file_sha256 or answer.file_sha256
        answer.lines.extend(p.discrepancies)
        if p.phase not in ("READY", "RECEIVE"):  # go-aheads: the SEND bar shows the upload
            bar.update(p.phase, p.done, p.total)
        if p.phase == "DONE":
            answer.done = p
    if answer.done is None:  # pragma: no cover - the ledger always ends with DONE
        raise Failure("the ledger ended without an answer", EXIT_UNREACHABLE)
    return answer


def _iso(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).isoformat() if ts.seconds or ts.nanos else ""


def summary(r: ledger_pb2.DiscountBillReconciliation, already: bool) -> dict[str, Any]:
    """The JSON answer: counts and fen of each kind, and both totals."""
    e = r.recorded
    out: dict[str, Any] = {
        "file_sha256": e.file_sha256,
        "already_reconciled": already,
        "rows": e.rows,
        "period_from": _iso(e.period_from),
        "period_to": _iso(e.period_to),
        "period_given": e.period_given,
        "platform_id": e.platform_id,
    }
    totals = {name: getattr(e, name) for name, _ in KINDS}
    out |= {name: t.count for name, t in totals.items()}
    out |= {
        "bill_total_fen": e.bill_total_fen,
        "ledger_total_fen": e.ledger_total_fen,
        "difference_fen": e.bill_total_fen - e.ledger_total_fen,
        "fen": {
            name: {"bill_fen": t.bill_fen, "ledger_fen": t.ledger_fen} for name, t in totals.items()
        },
        "discrepancies": e.discrepancies,
        "lines_sha256": e.lines_sha256,
        "reconciled_by": r.reconciled_by,
        "reconciled_at": _iso(r.reconciled_at),
    }
    return out


def _line_cells(d: ledger_pb2.BillDiscrepancy) -> list[object]:
    return [
        f"{KIND_ZH.get(d.kind, '')} {d.kind}".strip(),
        d.line or "",
        d.order_id,
        d.bill_payment_ref,
        d.ledger_payment_ref,
        d.bill_fen,
        d.ledger_fen,
        d.bill_fen - d.ledger_fen,
        _iso(d.paid_at),
        _iso(d.captured_at),
        d.ledger_status,
        d.first_line or "",
    ]


def _summary_cells(e: events_pb2.DiscountBillReconciled) -> Iterable[list[object]]:
    for name, kind in KINDS:
        t = getattr(e, name)
        yield [f"{KIND_ZH[kind]} {name}", t.count, t.bill_fen, t.ledger_fen]
    yield ["合计 total", e.rows, e.bill_total_fen, e.ledger_total_fen]
    yield ["文件 file_sha256", e.file_sha256, "", ""]
    yield ["期间 period", _iso(e.period_from), _iso(e.period_to), ""]


def write_report(prefix: str, answer: Answer) -> dict[str, str]:
    """The report's lines as PREFIX.csv and PREFIX.xlsx (the workbook with a summary sheet)."""
    assert answer.done is not None
    recorded = answer.done.reconciliation.recorded
    base = Path(prefix or f"reconciliation-{answer.file_sha256[:12]}")
    paths = {"report_csv": base.with_name(base.name + ".csv")}
    paths["report_xlsx"] = base.with_name(base.name + ".xlsx")
    lines = [_line_cells(d) for d in answer.lines]
    try:
        paths["report_csv"].write_bytes(csv_bytes(REPORT_HEADERS, lines))
        paths["report_xlsx"].write_bytes(
            xlsx_bytes(
                [
                    ("差异明细 discrepancies", REPORT_HEADERS, lines),
                    ("汇总 summary", SUMMARY_HEADERS, _summary_cells(recorded)),
                ]
            )
        )
    except OSError as exc:
        raise Failure(f"cannot write the report: {exc.strerror}") from None
    return {k: str(v) for k, v in paths.items()}


def tell_rejected(done: ledger_pb2.ReconcileProgress) -> None:
    """The malformed rows (a table on a terminal), on stderr."""
    console = stderr_console()
    if console.is_terminal:
        table = Table("line", "column", "reason", "message", title="malformed rows")
        for r in done.rejected:
            table.add_row(str(r.line), r.column, r.reason, r.message)
        console.print(table)
    else:
        for r in done.rejected:
            note(f"line {r.line}: {r.column or 'row'}: {r.reason}: {r.message}")
    note(f"{done.rejected_rows} malformed row(s): nothing recorded (fix the bill and import it)")


def finish(answer: Answer, report: str, json_only: bool) -> int:
    """Print the answer (and write the report); the exit code."""
    done = answer.done
    assert done is not None
    if not done.HasField("reconciliation"):
        if not json_only:
            tell_rejected(done)
        emit(
            {
                "outcome": "REJECTED",
                "file_sha256": done.file_sha256,
                "rows": done.total,
                "rejected_rows": done.rejected_rows,
                "rejected": [
                    {"line": r.line, "column": r.column, "reason": r.reason, "message": r.message}
                    for r in done.rejected
                ],
            }
        )
        return EXIT_NO
    out = summary(done.reconciliation, done.already_reconciled)
    out |= write_report(report, answer)
    if not json_only and done.already_reconciled:
        note("this bill was reconciled before: the recorded answer, nothing recorded now")
    emit(out)
    return EXIT_OK if out["discrepancies"] == 0 else EXIT_NO


@app.command("reconcile", rich_help_panel=PANEL)
def reconcile_bill(
    file: Annotated[Path, typer.Argument(help="the provider's discount bill (UTF-8 CSV)")],
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="captures from this time (included), ISO 8601 with offset",
            show_default=False,
        ),
    ] = "",
    end: Annotated[
        str,
        typer.Option(
            "--to", help="captures until this time (excluded); both or neither", show_default=False
        ),
    ] = "",
    platform: Annotated[
        str,
        typer.Option(
            help="the bill is this platform's: only its captures must be listed (default: all)"
        ),
    ] = "",
    report: ReportOpt = "",
    reason: Annotated[str, typer.Option(help="why (default: reconcile FILE)")] = "",
    timeout: TimeoutOpt = 600.0,
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Reconcile the payment provider's discount bill (立减账单) against the ledger."""
    period_from, period_to = parse_time(start), parse_time(end)
    if (period_from is None) != (period_to is None):
        raise typer.BadParameter("give both --from and --to, or neither")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read {file}: {exc.strerror}") from None
    who = identity(identity_dir, OPERATOR_DEMO)
    rows = max(data.count(b"\n") - 1, 0)

    async def call(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> Answer:
        with PhaseProgress(quiet=json_only) as bar:

            def sent(upto: int) -> None:
                bar.update("SEND", min(data.count(b"\n", 0, upto), rows), rows)

            header = bill_header(
                period_from, period_to, reason or f"reconcile {file.name}", platform
            )
            replies = send_bill(stub, data, header, deadline_s=timeout, sent=sent)
            return await collect(replies, bar)

    answer = ledger_call(ledger, who, call, timeout)
    raise typer.Exit(finish(answer, report, json_only))


@app.command("reconciliations", rich_help_panel=PANEL)
def reconciliations(
    file_sha256: Annotated[
        str, typer.Argument(help="one reconciliation (default: list them)", show_default=False)
    ] = "",
    report: ReportOpt = "",
    limit: Annotated[int, typer.Option(help="at most this many", min=1, max=500)] = 50,
    timeout: TimeoutOpt = 120.0,
    ledger: LedgerOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """The recorded discount-bill reconciliations, or one of them with its report."""
    who = identity(identity_dir, AUDITOR_DEMO)
    if not file_sha256:
        request = ledger_pb2.ListReconciliationsRequest(limit=limit)
        found = ledger_call(ledger, who, lambda stub: stub.ListReconciliations(request), timeout)
        for r in found.reconciliations:
            emit(summary(r, already=True))
        return

    async def call(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> Answer:
        request = ledger_pb2.GetReconciliationRequest(file_sha256=file_sha256)
        with PhaseProgress(quiet=json_only) as bar:
            return await collect(stub.GetReconciliation(request, timeout=timeout), bar)

    answer = ledger_call(ledger, who, call, timeout)
    assert answer.done is not None
    out = summary(answer.done.reconciliation, already=True)
    if report:
        out |= write_report(report, answer)
    emit(out)
