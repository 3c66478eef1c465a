"""The edge of discount-bill reconciliation: the bill's chunks assembled (bounded), the period
and reason validated once, the use case's steps streamed back.

Part of :class:`services.ledger.api.LedgerApi`. The streaming calls map domain errors to their
status themselves (the shared error-mapping interceptor wraps unary calls only), with the same
``ErrorInfo`` details.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel import validate
from services.kernel.errors import DomainError, InvalidArgument, concurrent_update
from services.kernel.events import Context
from services.kernel.eventstore import WrongExpectedVersion
from services.kernel.identity import caller
from services.kernel.rpc import STATUS_DETAILS_KEY, ServicerContext, status_of
from subsidy.v1 import ledger_pb2

from . import reconcile
from .handlers import Ledger
from .reconciliation import MAX_LIST, Progress, Recorded

MAX_CHUNK_BYTES: Final = 1024 * 1024
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


def _ts(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def discrepancy(d: reconcile.Discrepancy) -> ledger_pb2.BillDiscrepancy:
    """One report line on the wire."""
    return ledger_pb2.BillDiscrepancy(
        kind=d.kind,
        line=d.line,
        order_id=d.order_id,
        bill_payment_ref=d.bill_payment_ref,
        ledger_payment_ref=d.ledger_payment_ref,
        bill_fen=d.bill_fen,
        ledger_fen=d.ledger_fen,
        paid_at=_ts(d.paid_at),
        captured_at=_ts(d.captured_at),
        ledger_status=d.ledger_status,
        first_line=d.first_line,
    )


def reconciliation(r: Recorded) -> ledger_pb2.DiscountBillReconciliation:
    """A recorded reconciliation on the wire."""
    return ledger_pb2.DiscountBillReconciliation(
        recorded=r.event,
        reconciled_by=r.reconciled_by,
        reconciled_at=_ts(r.reconciled_at),
        reason=r.reason,
    )


def progress(p: Progress) -> ledger_pb2.ReconcileProgress:
    out = ledger_pb2.ReconcileProgress(
        phase=p.phase,
        done=p.done,
        total=p.total,
        discrepancies=[discrepancy(d) for d in p.lines],
        already_reconciled=p.already_reconciled,
        rejected=[
            ledger_pb2.BillRowError(
                line=e.line, column=e.column, reason=e.reason, message=e.message
            )
            for e in p.rejected
        ],
        rejected_rows=p.rejected_rows,
        file_sha256=p.file_sha256,
    )
    if p.recorded is not None:
        out.reconciliation.CopyFrom(reconciliation(p.recorded))
    return out


def _period(chunk: ledger_pb2.DiscountBillChunk) -> tuple[datetime | None, datetime | None]:
    start = chunk.period_from.ToDatetime(tzinfo=UTC) if chunk.HasField("period_from") else None
    end = chunk.period_to.ToDatetime(tzinfo=UTC) if chunk.HasField("period_to") else None
    return start, end


async def _bill(
    chunks: AsyncIterator[ledger_pb2.DiscountBillChunk],
) -> tuple[bytes, ledger_pb2.DiscountBillChunk]:
    """The whole file and its first chunk (which carries the period and the reason); refused
    as soon as it is larger than a bill may be, before more of it is read."""
    parts: list[bytes] = []
    size = 0
    first: ledger_pb2.DiscountBillChunk | None = None
    async for chunk in chunks:
        if first is None:
            first = chunk
        elif chunk.HasField("period_from") or chunk.HasField("period_to") or chunk.reason:
            raise InvalidArgument(
                "INVALID_CHUNK", "period and reason: on the first chunk only", field="period_from"
            )
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(
                "CHUNK_TOO_LARGE", f"data: at most {MAX_CHUNK_BYTES} bytes a chunk", field="data"
            )
        size += len(chunk.data)
        if size > reconcile.MAX_BILL_BYTES:
            raise InvalidArgument(
                "BILL_TOO_LARGE",
                f"csv: at most {reconcile.MAX_BILL_BYTES} bytes; split the bill",
                field="csv",
            )
        parts.append(chunk.data)
    return b"".join(parts), first or ledger_pb2.DiscountBillChunk()


async def _answering(
    context: ServicerContext, steps: Callable[[], AsyncIterator[ledger_pb2.ReconcileProgress]]
) -> AsyncIterator[ledger_pb2.ReconcileProgress]:
    """``steps``, with a domain error (or a lost race) aborting the call with its status."""
    try:
        async for step in steps():
            yield step
    except (DomainError, WrongExpectedVersion) as exc:
        err = exc if isinstance(exc, DomainError) else concurrent_update()
        code, message, status = status_of(err)
        await context.abort(code, message, trailing_metadata=((STATUS_DETAILS_KEY, status),))


class ReconciliationApi:
    """ReconcileDiscountBill, ListReconciliations, GetReconciliation."""

    ledger: Ledger

    async def ReconcileDiscountBill(
        self,
        request_iterator: AsyncIterator[ledger_pb2.DiscountBillChunk],
        context: ServicerContext,
    ) -> AsyncIterator[ledger_pb2.ReconcileProgress]:
        async def steps() -> AsyncIterator[ledger_pb2.ReconcileProgress]:
            data, first = await _bill(request_iterator)
            start, end = _period(first)
            reason = validate.text_field("reason", first.reason, max_len=500, required=False)
            if start is not None or end is not None:
                reconcile.period([], start, end)  # both or neither, in order: before any work
            ctx = Context(caller().actor(reason), correlation_id=reconcile.file_sha256(data))
            async for p in self.ledger.reconciliations.reconcile(data, start, end, ctx):
                yield progress(p)

        async for step in _answering(context, steps):
            yield step

    async def ListReconciliations(
        self, request: ledger_pb2.ListReconciliationsRequest, context: ServicerContext
    ) -> ledger_pb2.ListReconciliationsResponse:
        limit = request.limit or 50
        if not 0 < limit <= MAX_LIST:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_LIST}", field="limit")
        token = request.page_token
        if token and not (token.isascii() and token.isdigit() and len(token) <= 9):
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token: from a previous answer", field="page_token"
            )
        found, after = await self.ledger.reconciliations.recent(limit, int(token or 0))
        return ledger_pb2.ListReconciliationsResponse(
            reconciliations=[reconciliation(r) for r in found],
            next_page_token=str(after) if after is not None else "",
        )

    async def GetReconciliation(
        self, request: ledger_pb2.GetReconciliationRequest, context: ServicerContext
    ) -> AsyncIterator[ledger_pb2.ReconcileProgress]:
        async def steps() -> AsyncIterator[ledger_pb2.ReconcileProgress]:
            digest = request.file_sha256.strip().lower()
            if not _SHA256.fullmatch(digest):
                raise InvalidArgument(
                    "INVALID_SHA256", "file_sha256: 64 hexadecimal digits", field="file_sha256"
                )
            async for p in self.ledger.reconciliations.get(digest):
                yield progress(p)

        async for step in _answering(context, steps):
            yield step
