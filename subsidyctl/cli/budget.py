"""Funding a budget pool, maker-checker, against a running ledger service.

  subsidyctl budget propose POOL --amount-fen N [--source district] [--key K] --reason TEXT
  subsidyctl budget approve PROPOSAL_ID --reason TEXT
  subsidyctl budget status POOL

An operator proposes (nothing moves), a different approver approves (the pool is funded, at most
up to the ledger's configured ceiling); who proposes and who approves is the certificate's
identity (default: the demo operator and the demo approver). Each prints one JSON object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from services.kernel import rpc, tls
from subsidy.v1 import ledger_pb2, ledger_pb2_grpc

from ..stack.certs import APPROVER_DEMO, AUDITOR_DEMO, OPERATOR_DEMO
from .common import (
    ApproverIdentityOpt,
    AuditorIdentityOpt,
    JsonOpt,
    OperatorIdentityOpt,
    ReasonOpt,
    emit,
    identity,
    local_address,
    pick,
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


def show(p: ledger_pb2.FundingProposal) -> None:
    out = pick(p, "proposal_id", "pool_id", "amount_fen", "source", "status")
    out |= pick(p, "proposed_by", "approved_by")
    out["pool_funded_fen"] = p.pool.funded_fen
    emit(out)


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
    ledger: LedgerOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Propose funding a pool; nothing moves until a different approver approves it."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = ledger_pb2.ProposeFundingRequest(
        pool_id=pool, amount_fen=amount_fen, source=source, idempotency_key=key, reason=reason
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


@app.command()
def status(
    pool: Annotated[str, typer.Argument(help="the budget pool")],
    ledger: LedgerOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """A pool's figures: funded = available + reserved + spent."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = ledger_pb2.GetBudgetRequest(pool_id=pool)
    answer = ledger_call(ledger, who, lambda stub: stub.GetBudget(request))
    emit(pick(answer, "pool_id", "funded_fen", "available_fen", "reserved_fen", "spent_fen"))
