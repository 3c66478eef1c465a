"""Merchant settlement batches, maker-checker, against a running ledger service.

  subsidyctl settlement create BATCH_ID --merchant M --from ISO --to ISO --reason TEXT
  subsidyctl settlement approve BATCH_ID --reason TEXT
  subsidyctl settlement export BATCH_ID [--out DIR]
  subsidyctl settlement paid BATCH_ID --payment-ref REF
  subsidyctl settlement overdue [--merchant M]
  subsidyctl settlement returns [--merchant M] [--out DIR]

An operator creates a merchant's batch for a period (its evidenced, unrefunded captures not in
another batch, less its outstanding clawbacks); a different approver approves it (from then on
it never changes); ``export`` writes the batch's lines as CSV and XLSX (formula-safe) for the
payment; an operator marks it paid with the transfer's reference. ``overdue`` lists the captures
still without evidence past their policy's ``evidence_days``; ``returns`` is the returns ledger
(退换货台账: every refund, the batch that had paid it and its clawback), also as CSV and XLSX.
Each prints one JSON object.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from services.kernel.contract.spreadsheet import csv_bytes, xlsx_bytes
from subsidy.v1 import ledger_pb2, ledger_pb2_grpc

from ..stack.certs import APPROVER_DEMO, OPERATOR_DEMO
from .budget import LedgerOpt, ledger_call
from .common import (
    ApproverIdentityOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    ReasonOpt,
    emit,
    identity,
    pick,
)

app = typer.Typer(
    name="settlement",
    help="Settle the merchants: create a batch, approve it by another person, export, mark paid.",
    no_args_is_help=True,
)
BatchArg = Annotated[str, typer.Argument(help="the batch's id, e.g. sb-m-1-2025-06")]
HEADERS = ("batch_id", "merchant_id", "kind", "order_id", "fen")


def _at(ts: Any) -> str:
    return str(ts.ToDatetime(tzinfo=dt.UTC).isoformat())


def report(b: ledger_pb2.SettlementBatch) -> dict[str, Any]:
    """What every settlement command prints: the batch, its lines and its deductions."""
    out = pick(b, "batch_id", "merchant_id", "status", "gross_fen", "clawback_fen", "net_fen")
    out |= pick(b, "created_by", "approved_by", "payment_ref")
    out["period_from"], out["period_to"] = _at(b.period_from), _at(b.period_to)
    out["lines"] = [{"order_id": x.order_id, "subsidy_fen": x.subsidy_fen} for x in b.lines]
    out["clawbacks"] = [{"order_id": c.order_id, "fen": c.fen} for c in b.clawbacks]
    return out


def rows(b: ledger_pb2.SettlementBatch) -> list[tuple[object, ...]]:
    """The export's rows: each paid capture, each deducted clawback (negative), the net."""
    out: list[tuple[object, ...]] = [
        (b.batch_id, b.merchant_id, "capture", x.order_id, x.subsidy_fen) for x in b.lines
    ]
    out += [(b.batch_id, b.merchant_id, "clawback", c.order_id, -c.fen) for c in b.clawbacks]
    out.append((b.batch_id, b.merchant_id, "net", "", b.net_fen))
    return out


def _time(option: str, text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise Failure(
            f"{option} {text!r}: an ISO 8601 time with its offset, e.g. 2025-06-01T00:00+08:00"
        )
    return when.astimezone(dt.UTC)


@app.command()
def create(
    batch_id: BatchArg,
    merchant: Annotated[str, typer.Option(help="the merchant to settle")],
    start: Annotated[str, typer.Option("--from", help="captures from (ISO 8601, included)")],
    end: Annotated[str, typer.Option("--to", help="captures to (ISO 8601, excluded)")],
    reason: ReasonOpt,
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Create a merchant's batch for a period; nothing is owed until another person approves."""
    request = ledger_pb2.CreateSettlementBatchRequest(
        batch_id=batch_id, merchant_id=merchant, reason=reason
    )
    request.period_from.FromDatetime(_time("--from", start))
    request.period_to.FromDatetime(_time("--to", end))
    who = identity(identity_dir, OPERATOR_DEMO)
    emit(report(ledger_call(ledger, who, lambda stub: stub.CreateSettlementBatch(request))))


@app.command()
def approve(
    batch_id: BatchArg,
    reason: ReasonOpt,
    ledger: LedgerOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Approve someone else's batch: from now on it never changes."""
    request = ledger_pb2.ApproveSettlementBatchRequest(batch_id=batch_id, reason=reason)
    who = identity(identity_dir, APPROVER_DEMO)
    emit(report(ledger_call(ledger, who, lambda stub: stub.ApproveSettlementBatch(request))))


@app.command()
def export(
    batch_id: BatchArg,
    out: Annotated[
        Path, typer.Option(help="directory for BATCH_ID.csv and BATCH_ID.xlsx")
    ] = Path(),
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Write an approved batch's lines as CSV and XLSX for the payment."""
    request = ledger_pb2.GetSettlementBatchRequest(batch_id=batch_id)
    who = identity(identity_dir, OPERATOR_DEMO)
    batch = ledger_call(ledger, who, lambda stub: stub.GetSettlementBatch(request))
    if batch.status == "CREATED":
        raise Failure(f"batch {batch_id} is not approved yet: approve it before paying it")
    out.mkdir(parents=True, exist_ok=True)
    csv_path, xlsx_path = out / f"{batch_id}.csv", out / f"{batch_id}.xlsx"
    csv_path.write_bytes(csv_bytes(HEADERS, rows(batch)))
    xlsx_path.write_bytes(xlsx_bytes([("settlement", HEADERS, rows(batch))]))
    emit(report(batch) | {"csv": str(csv_path), "xlsx": str(xlsx_path)})


@app.command()
def paid(
    batch_id: BatchArg,
    payment_ref: Annotated[str, typer.Option(help="the bank transfer's reference")],
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Mark an approved batch paid by the transfer ``--payment-ref``."""
    request = ledger_pb2.MarkSettlementBatchPaidRequest(batch_id=batch_id, payment_ref=payment_ref)
    who = identity(identity_dir, OPERATOR_DEMO)
    emit(report(ledger_call(ledger, who, lambda stub: stub.MarkSettlementBatchPaid(request))))


MerchantOpt = Annotated[str, typer.Option("--merchant", help="one merchant's only")]
RETURN_HEADERS = (
    "order_id",
    "item",  # of a multi-item order ("": the whole order)
    "merchant_id",
    "platform_id",
    "sku",
    "subsidy_fen",
    "captured_at",
    "refunded_at",
    "batch_id",
    "clawback",
    "deducted_by",
)


@app.command()
def overdue(
    merchant: MerchantOpt = "",
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Captures still without delivery / activation evidence past their policy's days."""
    who = identity(identity_dir, OPERATOR_DEMO)
    captures: list[ledger_pb2.OverdueCapture] = []
    token = ""

    def page(
        stub: ledger_pb2_grpc.LedgerServiceAsyncStub, token: str
    ) -> Awaitable[ledger_pb2.ListOverdueEvidenceResponse]:
        return stub.ListOverdueEvidence(
            ledger_pb2.ListOverdueEvidenceRequest(
                merchant_id=merchant, limit=1000, page_token=token
            )
        )

    while True:  # every page (each call scans a bounded part of the captures)
        answer = ledger_call(ledger, who, partial(page, token=token))
        captures += answer.captures
        token = answer.next_page_token
        if not token:
            break
    listed = [
        pick(c, "order_id", "item", "merchant_id", "platform_id", "subsidy_fen", "policy_version")
        | {"captured_at": _at(c.captured_at), "due_at": _at(c.due_at)}
        for c in captures
    ]
    emit({"overdue": len(listed), "captures": listed})


@app.command()
def returns(
    merchant: MerchantOpt = "",
    out: Annotated[Path | None, typer.Option(help="also write returns.csv and .xlsx here")] = None,
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """The returns ledger (退换货台账): every refund of a captured order, newest first."""
    request = ledger_pb2.ListReturnsRequest(merchant_id=merchant, limit=1000)
    who = identity(identity_dir, OPERATOR_DEMO)
    answer = ledger_call(ledger, who, lambda stub: stub.ListReturns(request))
    entries = [
        pick(r, "order_id", "item", "merchant_id", "platform_id", "sku", "subsidy_fen")
        | {"captured_at": _at(r.captured_at), "refunded_at": _at(r.refunded_at)}
        | pick(r, "batch_id", "clawback", "deducted_by")
        for r in answer.returns
    ]
    report_out: dict[str, Any] = {"returns": entries}
    if out is not None:
        table = [tuple(e[h] for h in RETURN_HEADERS) for e in entries]
        out.mkdir(parents=True, exist_ok=True)
        (out / "returns.csv").write_bytes(csv_bytes(RETURN_HEADERS, table))
        (out / "returns.xlsx").write_bytes(xlsx_bytes([("returns", RETURN_HEADERS, table)]))
        report_out |= {"csv": str(out / "returns.csv"), "xlsx": str(out / "returns.xlsx")}
    emit(report_out)
