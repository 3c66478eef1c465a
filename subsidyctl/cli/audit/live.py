"""The live side of each total ``audit verify`` compares: the owning service's own figures,
through its read RPCs (one reader per fold of :data:`services.audit.totals.FOLDS`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc

from services.audit.totals import (
    BatchRow,
    Table,
    batch_table,
    pool_table,
    return_figures,
    return_key,
)
from services.kernel.contract import budget
from services.kernel.contract.order_line import line_of
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


async def live_settlement(src: Sources, log: Table) -> Table | None:
    """Every settlement batch, as the ledger lists them (ListSettlementBatches)."""
    if src.ledger is None:
        return None
    batches: list[BatchRow] = []
    cursor = ""
    while True:
        page = await src.ledger.ListSettlementBatches(
            ledger_pb2.ListSettlementBatchesRequest(cursor=cursor, limit=PAGE)
        )
        for b in page.batches:
            status = {
                "approved": int(b.status in ("APPROVED", "PAID")),
                "paid": int(b.status == "PAID"),
            }
            batches.append(
                (
                    b.batch_id,
                    b.merchant_id,
                    b.period_from.ToJsonString(),
                    b.period_to.ToJsonString(),
                    {line.order_id: line.subsidy_fen for line in b.lines},
                    {c.order_id: c.fen for c in b.clawbacks},
                    {
                        "orders": len(b.lines),
                        "gross_fen": b.gross_fen,
                        "clawbacks": len(b.clawbacks),
                        "clawback_fen": b.clawback_fen,
                        "net_fen": b.net_fen,
                    }
                    | status,
                )
            )
        if not (cursor := page.next_cursor):
            return batch_table(batches)


async def live_returns(src: Sources, log: Table) -> Table | None:
    """The returns ledger, as the ledger lists it (ListReturns, every page)."""
    if src.ledger is None:
        return None
    out: Table = {}
    cursor = ""
    while True:
        page = await src.ledger.ListReturns(
            ledger_pb2.ListReturnsRequest(cursor=cursor, limit=PAGE)
        )
        for r in page.returns:
            # A multi-item order's refund is of one item: its line (order/item), as the log's
            # events name it.
            key = return_key(
                line_of(r.order_id, r.item),
                r.merchant_id,
                r.platform_id,
                r.sku,
                r.batch_id,
                r.deducted_by,
            )
            out[key] = return_figures(r.subsidy_fen, clawed_back=r.clawback != "NONE")
        if not (cursor := page.next_cursor):
            return out


# One reader per fold of services.audit.totals.FOLDS: a new total adds its fold there and its
# reader here.
LIVE: dict[str, Callable[[Sources, Table], Awaitable[Table | None]]] = {
    "pool": live_pools,
    "quota": live_quotas,
    "person": live_persons,
    "sales": live_sales,
    "settlement": live_settlement,
    "returns": live_returns,
}
