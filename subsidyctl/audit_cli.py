"""subsidyctl audit verify: check the audit log and the ledger against each other.

Fetches every entry from the audit service, recomputes the hash chain and compares its head with
the one the service reports, rebuilds every budget pool from the log's events alone (checking the
budget invariant after each), and compares each with what the ledger reports. Prints one JSON
object; exit 0 when everything agrees, 1 with the first disagreement otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import grpc

from services.audit.verify import compare_pools, replay
from services.contract import budget
from services.invariants import InvariantViolation
from services.kernel import rpc
from subsidy.v1 import audit_pb2, audit_pb2_grpc, ledger_pb2, ledger_pb2_grpc


async def verify(
    audit: audit_pb2_grpc.AuditServiceAsyncStub, ledger: ledger_pb2_grpc.LedgerServiceAsyncStub
) -> dict[str, Any]:
    """Run every check; raises InvariantViolation at the first disagreement."""
    info = await audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
    rows: list[tuple[int, bytes, bytes, bytes]] = []
    while len(rows) < info.size:
        page = await audit.GetEntries(audit_pb2.GetEntriesRequest(start=len(rows), limit=1000))
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


def verify_command(args: argparse.Namespace) -> int:
    base = int(os.environ.get("SUBSIDY_BASE_PORT", "7100"))
    audit_addr = args.audit or f"127.0.0.1:{base + 4}"
    ledger_addr = args.ledger or f"127.0.0.1:{base + 3}"

    async def run() -> dict[str, Any]:
        audit_ch, ledger_ch = rpc.channel(audit_addr), rpc.channel(ledger_addr)
        try:
            return await verify(
                audit_pb2_grpc.AuditServiceStub(audit_ch),
                ledger_pb2_grpc.LedgerServiceStub(ledger_ch),
            )
        finally:
            await audit_ch.close()
            await ledger_ch.close()

    try:
        print(json.dumps(asyncio.run(run()), ensure_ascii=False))
        return 0
    except InvariantViolation as exc:
        print(json.dumps({"ok": False, "violation": str(exc)}, ensure_ascii=False))
        return 1
    except grpc.aio.AioRpcError as err:
        print(f"audit verify: {err.code().name}: {err.details()}", file=sys.stderr)
        return 3


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="auditor commands")
    verbs = audit.add_subparsers(dest="audit_command", required=True)
    v = verbs.add_parser("verify", help="check the audit log's chain and the ledger's figures")
    v.add_argument("--audit", default="", help="audit service HOST:PORT (default: local stack)")
    v.add_argument("--ledger", default="", help="ledger service HOST:PORT (default: local stack)")
    v.set_defaults(fn=verify_command)
