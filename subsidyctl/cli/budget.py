"""Funding a budget pool, maker-checker, and watching it, against a running ledger service.

  subsidyctl budget propose POOL --amount-fen N [--source district] [--key K]
                            [--tranche ISO_TIME=FEN ...] --reason TEXT
  subsidyctl budget approve PROPOSAL_ID --reason TEXT
  subsidyctl budget status POOL

An operator proposes (nothing moves), a different approver approves (the pool is funded, at most
up to the ledger's configured ceiling); who proposes and who approves is the certificate's
identity (default: the demo operator and the demo approver). A funding names one of the
campaign's sources (the policy's ``funding.sources``) and may come in tranches, each available
from its time. ``status`` shows the pool and each source (funded = available + reserved +
spent), each category against its sub-budget, the alert thresholds reached and the tranches
still scheduled, with the funding rules of the policy in force. Each prints one JSON object
(and, at a terminal, tables on stderr).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from services.kernel import rpc, tls
from services.kernel.contract.policy import BP_DENOMINATOR
from subsidy.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

from ..stack.certs import APPROVER_DEMO, AUDITOR_DEMO, OPERATOR_DEMO
from .common import (
    ApproverIdentityOpt,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    ReasonOpt,
    emit,
    identity,
    local_address,
    pick,
    stderr_console,
)

T = TypeVar("T")
LedgerOpt = Annotated[
    str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
]
SourceOpt = Annotated[str, typer.Option(help="who pays: district, platform-matching, …")]
KeyOpt = Annotated[str, typer.Option(help="idempotency key: the same key is the same proposal")]
app = typer.Typer(
    name="budget",
    help="Fund a budget pool: propose, then approve by another person.",
    no_args_is_help=True,
)


def ledger_call(
    address: str,
    who: tls.CertificateSource,
    call: Callable[[ledger_pb2_grpc.LedgerServiceAsyncStub], Awaitable[T]],
) -> T:
    """Run ``call`` as ``who`` against the ledger (a failure propagates; cli.main prints it)."""

    async def go() -> T:
        channel = rpc.channel(address or local_address("ledger"), who, deadline_s=10)
        try:
            return await call(ledger_pb2_grpc.LedgerServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(go())


def _at(ts: Any) -> str:
    return str(ts.ToDatetime(tzinfo=dt.UTC).isoformat())


def show(p: ledger_pb2.FundingProposal) -> None:
    out = pick(p, "proposal_id", "pool_id", "amount_fen", "source", "status")
    out |= pick(p, "proposed_by", "approved_by")
    out["tranches"] = [
        {"amount_fen": t.amount_fen, "releases_at": _at(t.releases_at)} for t in p.tranches
    ]
    out["pool_funded_fen"] = p.pool.funded_fen
    out["pool_scheduled_fen"] = p.pool.scheduled_fen
    emit(out)


def tranche(text: str) -> common_pb2.Tranche:
    """``2025-07-01T00:00:00+08:00=100000``: an instalment of 100,000 fen from that time."""
    at, sep, fen = text.rpartition("=")
    try:
        when = dt.datetime.fromisoformat(at) if sep else None
        amount = int(fen)
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise Failure(
            f"--tranche {text!r}: ISO_TIME_WITH_OFFSET=FEN, e.g. 2025-07-01T00:00+08:00=1000"
        )
    out = common_pb2.Tranche(amount_fen=amount)
    out.releases_at.FromDatetime(when.astimezone(dt.UTC))
    return out


@app.command()
def propose(
    pool: Annotated[str, typer.Argument(help="the budget pool, e.g. pingshan-2025")],
    amount_fen: Annotated[int, typer.Option(help="integer fen (1 yuan = 100 fen)")],
    reason: ReasonOpt,
    source: Annotated[
        str, typer.Option(help="who pays: district, platform-matching, …")
    ] = "district",
    key: Annotated[
        str, typer.Option(help="idempotency key: the same key is the same proposal")
    ] = "",
    tranches: Annotated[
        list[str] | None,
        typer.Option(
            "--tranche",
            help="ISO_TIME=FEN, repeatable: an instalment available from that time (together"
            " exactly --amount-fen); none: all of it at approval",
        ),
    ] = None,
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose funding a pool; nothing moves until a different approver approves it."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = ledger_pb2.ProposeFundingRequest(
        pool_id=pool,
        amount_fen=amount_fen,
        source=source,
        idempotency_key=key,
        reason=reason,
        tranches=[tranche(t) for t in tranches or ()],
    )
    show(ledger_call(ledger, who, lambda stub: stub.ProposeFunding(request)))


@app.command()
def approve(
    proposal_id: Annotated[str, typer.Argument(help="from `budget propose`, e.g. fp-…")],
    reason: ReasonOpt,
    ledger: LedgerOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Approve someone else's funding proposal: the pool is funded."""
    who = identity(identity_dir, APPROVER_DEMO)
    request = ledger_pb2.ApproveFundingRequest(proposal_id=proposal_id, reason=reason)
    show(ledger_call(ledger, who, lambda stub: stub.ApproveFunding(request)))


def share_bp(spent: int, base: int) -> int | None:
    """``spent`` as basis points of ``base`` (rounded down), or None without a base."""
    return spent * BP_DENOMINATOR // base if base > 0 else None


def status_report(b: ledger_pb2.BudgetPool) -> dict[str, Any]:
    """What ``budget status`` prints: the ledger's figures, read against the funding rules of
    the policy in force (the split rule, the thresholds, each category's sub-budget)."""
    out = pick(b, "pool_id", "funded_fen", "available_fen", "reserved_fen", "spent_fen")
    out["scheduled_fen"] = b.scheduled_fen
    out["spent_bp"] = share_bp(b.spent_fen, b.funded_fen)
    out["sources"] = [
        pick(s, "source", "funded_fen", "available_fen", "reserved_fen", "spent_fen")
        | {"scheduled_fen": s.scheduled_fen, "spent_bp": share_bp(s.spent_fen, s.funded_fen)}
        for s in b.sources
    ]
    out["categories"] = []
    for c in b.categories:
        cap = c.sub_budget_fen if c.HasField("sub_budget_fen") else None
        out["categories"].append(
            pick(c, "category", "reserved_fen", "spent_fen")
            | {
                "sub_budget_fen": cap,
                "spent_bp": share_bp(c.spent_fen, b.funded_fen if cap is None else cap),
            }
        )
    out["alerts"] = [
        pick(a, "category", "threshold_bp", "spent_fen", "base_fen", "order_id")
        | {"reached_at": _at(a.reached_at)}
        for a in b.alerts
    ]
    out["tranches"] = [
        pick(t, "source", "amount_fen", "funding_key") | {"releases_at": _at(t.releases_at)}
        for t in b.tranches
    ]
    out["policy"] = pick(b, "policy_version", "split", "alert_thresholds_bp")
    return out


def tables(report: dict[str, Any]) -> None:
    """The report as tables on stderr, for a person at a terminal."""
    console = stderr_console()
    if not console.is_terminal:
        return
    for title, key, columns in (
        (
            f"pool {report['pool_id']}: sources",
            "sources",
            ("source", "funded_fen", "available_fen", "reserved_fen", "spent_fen", "spent_bp"),
        ),
        (
            "categories",
            "categories",
            ("category", "reserved_fen", "spent_fen", "sub_budget_fen", "spent_bp"),
        ),
        ("thresholds reached", "alerts", ("category", "threshold_bp", "spent_fen", "reached_at")),
        ("tranches scheduled", "tranches", ("source", "amount_fen", "releases_at")),
    ):
        if report[key]:
            t = Table(*columns, title=title)
            for row in report[key]:
                t.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
            console.print(t)


@app.command()
def status(
    pool: Annotated[str, typer.Argument(help="the budget pool")],
    ledger: LedgerOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """A pool's figures and each source's (funded = available + reserved + spent), each
    category against its sub-budget, the thresholds reached and the tranches to come."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = ledger_pb2.GetBudgetRequest(pool_id=pool)
    answer = ledger_call(ledger, who, lambda stub: stub.GetBudget(request))
    report = status_report(answer)
    emit(report)
    if not json_only:
        tables(report)
