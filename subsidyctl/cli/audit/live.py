"""The live side of each total ``audit verify`` compares: the owning service's own figures,
through its read RPCs (one reader per fold of :data:`services.audit.totals.FOLDS`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from services.audit.totals import Table, pool_table
from services.kernel.contract import budget
from subsidy.v1 import (
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    eventlog_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

PAGE = 1000


@dataclass
class Sources:
    """Where the auditor reads: the audit log, and each service's read RPCs and store."""

    audit: audit_pb2_grpc.AuditServiceAsyncStub
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub | None = None
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub | None = None
    usage: usage_pb2_grpc.UsageServiceAsyncStub | None = None
    stores: Mapping[str, eventlog_pb2_grpc.EventLogServiceAsyncStub] = field(default_factory=dict)


async def live_pools(src: Sources, log: Table) -> Table | None:
    """Each pool the log has, as the ledger reports it (GetBudget)."""
    if src.ledger is None:
        return None
    pools: list[budget.Pool] = []
    for pool_id in sorted({key[0] for key in log}):
        try:
            b = await src.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        pools.append(budget.pool_of(b))  # the pool's figures and each source's
    return pool_table(pools)


async def live_quotas(src: Sources, log: Table) -> Table | None:
    if src.usage is None:
        return None
    out: Table = {}
    cursor = ""
    while True:
        page = await src.usage.ListQuotaUsage(usage_pb2.ListUsageRequest(cursor=cursor, limit=PAGE))
        out |= {(r.category, r.day): {"issued": r.issued} for r in page.rows}
        if not (cursor := page.next_cursor):
            return out


async def live_persons(src: Sources, log: Table) -> Table | None:
    if src.usage is None:
        return None
    out: Table = {}
    cursor = ""
    while True:
        page = await src.usage.ListPersonUsage(
            usage_pb2.ListUsageRequest(cursor=cursor, limit=PAGE)
        )
        out |= {(r.id_number_index, r.category): dict(r.by_status) for r in page.rows}
        if not (cursor := page.next_cursor):
            return out


async def live_sales(src: Sources, log: Table) -> Table | None:
    if src.catalog is None:
        return None
    ledger = await src.catalog.GetSalesLedger(catalog_pb2.GetSalesLedgerRequest())
    return {
        (r.merchant_id, r.sku): {
            "sold_units": r.sold_units,
            "sales_fen": r.sales_fen,
            "subsidy_fen": r.subsidy_fen,
            "refunded_units": r.refunded_units,
            "refunded_sales_fen": r.refunded_sales_fen,
            "refunded_subsidy_fen": r.refunded_subsidy_fen,
        }
        for r in ledger.rows
    }


# One reader per fold of services.audit.totals.FOLDS: a new total adds its fold there and its
# reader here.
LIVE: dict[str, Callable[[Sources, Table], Awaitable[Table | None]]] = {
    "pool": live_pools,
    "quota": live_quotas,
    "person": live_persons,
    "sales": live_sales,
}
