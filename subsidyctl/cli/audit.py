"""Auditor commands: ``subsidyctl audit verify`` checks the audit log and the ledger against
each other.

Fetches every entry from the audit service (a Rich progress bar on a terminal), recomputes the
hash chain and compares its head with the one the service reports, rebuilds every budget pool
from the log's events alone (checking the budget invariant after each), and compares each with
what the ledger reports. Calls as ``--identity DIR`` (default: the demo auditor). Prints one
JSON object; exit 0 when everything agrees, 1 with the first
disagreement (``{"ok": false, "violation": ...}``) otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import typer

from services.audit.verify import compare_pools, replay
from services.contract import budget
from services.invariants import InvariantViolation
from services.kernel import rpc
from subsidy.v1 import audit_pb2, audit_pb2_grpc, ledger_pb2, ledger_pb2_grpc

from ..stack.certs import AUDITOR_DEMO
from .common import EXIT_NO, AuditorIdentityOpt, JsonOpt, emit, identity, local_address
from .progress import PhaseProgress

app = typer.Typer(name="audit", help="Auditor commands.", no_args_is_help=True)
PAGE = 1000


async def verify(
    audit: audit_pb2_grpc.AuditServiceAsyncStub,
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every check; raises InvariantViolation at the first disagreement.

    ``progress(fetched, size)`` is called after each page of entries."""
    info = await audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
    rows: list[tuple[int, bytes, bytes, bytes]] = []
    while len(rows) < info.size:
        page = await audit.GetEntries(audit_pb2.GetEntriesRequest(start=len(rows), limit=PAGE))
        if not page.entries:
            break
        rows += [
            (
                e.index,
                bytes.fromhex(e.leaf_hash_hex),
                bytes.fromhex(e.chain_hash_hex),
                e.envelope.SerializeToString(deterministic=True),
            )
            for e in page.entries
        ]
        if progress is not None:
            progress(len(rows), info.size)
    result = replay(rows)
    if result.size == info.size and result.head.hex() != info.head_hash_hex:
        raise InvariantViolation("the audit log's reported head does not match its entries")
    reported: dict[str, budget.Pool] = {}
    for pool_id in result.pools:
        b = await ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        reported[pool_id] = budget.Pool(
            pool_id, b.funded_fen, b.available_fen, b.reserved_fen, b.spent_fen
        )
    compare_pools(result.pools, reported)
    return {
        "ok": True,
        "entries": result.size,
        "head_hash_hex": result.head.hex(),
        "events_by_service": result.events_by_service,
        "pools": {
            p.pool_id: {
                "funded_fen": p.funded,
                "available_fen": p.available,
                "reserved_fen": p.reserved,
                "spent_fen": p.spent,
            }
            for p in result.pools.values()
        },
    }


@app.command("verify")
def verify_command(
    audit: Annotated[
        str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")
    ] = "",
    ledger: Annotated[
        str, typer.Option(help="ledger service HOST:PORT (default: the local stack's)")
    ] = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Check the audit log's chain and the ledger's figures against each other."""
    audit_addr = audit or local_address("audit")
    ledger_addr = ledger or local_address("ledger")
    who = identity(identity_dir, AUDITOR_DEMO)

    async def run() -> dict[str, Any]:
        audit_ch, ledger_ch = rpc.channel(audit_addr, who), rpc.channel(ledger_addr, who)
        try:
            # A bar on a terminal only: piped, audit verify prints nothing but its answer.
            with PhaseProgress(unit="entries", plain=False, quiet=json_only) as bar:
                return await verify(
                    audit_pb2_grpc.AuditServiceStub(audit_ch),
                    ledger_pb2_grpc.LedgerServiceStub(ledger_ch),
                    lambda done, total: bar.update("FETCH", done, total),
                )
        finally:
            await audit_ch.close()
            await ledger_ch.close()

    try:
        emit(asyncio.run(run()))
    except InvariantViolation as exc:
        emit({"ok": False, "violation": str(exc)})
        raise typer.Exit(EXIT_NO) from None
