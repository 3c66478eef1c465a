"""The edge of discount-bill reconciliation: the bill's chunks assembled (bounded), the period
and reason validated once, the use case's steps streamed back.

Part of :class:`services.ledger.api.LedgerApi`. The streaming calls map domain errors to their
status themselves (the shared error-mapping interceptor wraps unary calls only), with the same
``ErrorInfo`` details.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
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
    start = (
        validate.timestamp("period_from", chunk.period_from)
        if chunk.HasField("period_from")
        else None
    )
    end = validate.timestamp("period_to", chunk.period_to) if chunk.HasField("period_to") else None
    return start, end


def _header(
    chunk: ledger_pb2.DiscountBillChunk | None,
) -> tuple[int, datetime | None, datetime | None, str, str]:
    """The bill's size, period, reason and platform, checked before any byte of it is
    accepted."""
    if chunk is None:
        raise InvalidArgument(
            "MISSING_HEADER", "file_bytes: the first message is the header", field="file_bytes"
        )
    if chunk.data:
        raise InvalidArgument(
            "INVALID_CHUNK", "data: the header carries none (send it on RECEIVE)", field="data"
        )
    if chunk.file_bytes <= 0:
        raise InvalidArgument("EMPTY_BILL", "csv: the file is empty", field="csv")
    if chunk.file_bytes > reconcile.MAX_BILL_BYTES:
        raise InvalidArgument(
            "BILL_TOO_LARGE",
            f"csv: at most {reconcile.MAX_BILL_BYTES} bytes; split the bill",
            field="csv",
        )
    start, end = _period(chunk)
    if start is not None or end is not None:
        reconcile.period([], start, end)  # both or neither, in order: before any byte
    reason = validate.text_field("reason", chunk.reason, max_len=500, required=False)
    platform = validate.identifier("platform_id", chunk.platform_id) if chunk.platform_id else ""
    return chunk.file_bytes, start, end, reason, platform


async def _receive(chunks: AsyncIterator[ledger_pb2.DiscountBillChunk], size: int) -> bytes:
    """Exactly ``size`` bytes of the file, in chunks of at most 1 MiB; more is refused as soon
    as it arrives, and nothing more is read once they are in."""
    parts: list[bytes] = []
    received = 0
    while received < size:
        chunk = await anext(chunks, None)
        if chunk is None:
            raise InvalidArgument(
                "BILL_INCOMPLETE",
                f"data: {received} of the {size} bytes the header announced",
                field="data",
            )
        if (
            chunk.HasField("period_from")
            or chunk.HasField("period_to")
            or chunk.reason
            or chunk.platform_id
        ):
            raise InvalidArgument(
                "INVALID_CHUNK",
                "period, platform and reason: in the header only",
                field="period_from",
            )
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(
                "CHUNK_TOO_LARGE", f"data: at most {MAX_CHUNK_BYTES} bytes a chunk", field="data"
            )
        received += len(chunk.data)
        if received > size:
            raise InvalidArgument(
                "BILL_LONGER_THAN_ANNOUNCED",
                f"data: more than the {size} bytes the header announced",
                field="data",
            )
        parts.append(chunk.data)
    return b"".join(parts)


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
            # Nothing is read before the caller is told to send: a client writing while the
            # server refuses can see INTERNAL instead of the refusal (grpc's client races).
            yield ledger_pb2.ReconcileProgress(phase="READY")
            requests = aiter(request_iterator)
            size, start, end, reason, platform = _header(await anext(requests, None))
            yield ledger_pb2.ReconcileProgress(phase="RECEIVE", done=0, total=size)
            data = await _receive(requests, size)
            ctx = Context(caller().actor(reason), correlation_id=reconcile.file_sha256(data))
            reconciling = self.ledger.reconciliations.reconcile(data, start, end, platform, ctx)
            async for p in reconciling:
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
