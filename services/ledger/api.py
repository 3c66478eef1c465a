"""The ledger's gRPC servicer: the edge, where every request field is validated once and the
actor is settled; the use cases in handlers.py receive commands of clean values."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from services.kernel import validate
from services.kernel.contract import order_line
from services.kernel.contract.budget import Pool
from services.kernel.contract.policy import BP_DENOMINATOR, MAX_PRICE_FEN
from services.kernel.errors import InvalidArgument, NotFound
from services.kernel.identity import caller, own_platform, scope
from services.kernel.riskscreen import circumstances_of
from services.kernel.rpc import ServicerContext
from subsidy.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from subsidy.v1 import events_pb2 as ev

from . import domain
from . import settlement_domain as sd
from .fundreports_api import FundReportsApi
from .handlers import BudgetStatus, Ledger
from .reconciliation_api import ReconciliationApi

EARLIEST_TRANCHE = datetime(2000, 1, 1, tzinfo=UTC)
TRANCHE_HORIZON = timedelta(days=3653)  # a schedule reaches at most ten years ahead


def _pool(p: Pool) -> ledger_pb2.BudgetPool:
    return ledger_pb2.BudgetPool(
        pool_id=p.pool_id,
        funded_fen=p.funded,
        available_fen=p.available,
        reserved_fen=p.reserved,
        spent_fen=p.spent,
        scheduled_fen=p.scheduled,
        sources=[
            ledger_pb2.SourceBalance(
                source=s.source,
                funded_fen=s.funded,
                available_fen=s.available,
                reserved_fen=s.reserved,
                spent_fen=s.spent,
                scheduled_fen=s.scheduled,
            )
            for s in p.sources
        ],
    )


def _status(status: BudgetStatus) -> ledger_pb2.BudgetPool:
    out = _pool(status.pool)
    out.shards = status.shards
    rules = status.rules
    if rules is not None:
        out.policy_version = status.policy_version
        out.split = rules.split.value
        out.alert_thresholds_bp.extend(rules.alert_thresholds_bp)
    for c in sorted(status.categories, key=lambda c: c.category):
        row = out.categories.add(category=c.category, reserved_fen=c.reserved, spent_fen=c.spent)
        share_bp = rules.sub_budget_bp(c.category) if rules is not None else None
        if share_bp is not None:
            row.sub_budget_fen = status.pool.funded * share_bp // BP_DENOMINATOR
    for a in status.alerts:
        alert = out.alerts.add(
            category=a.category,
            threshold_bp=a.threshold_bp,
            spent_fen=a.spent_fen,
            base_fen=a.base_fen,
            order_id=a.order_id,
        )
        alert.reached_at.FromDatetime(a.reached_at)
    for t in status.tranches:
        pending = out.tranches.add(
            source=t.source, amount_fen=t.amount_fen, funding_key=t.funding_key, index=t.index
        )
        pending.releases_at.FromDatetime(t.releases_at)
    return out


def _tranches_pb(tranches: Sequence[domain.Tranche]) -> list[common_pb2.Tranche]:
    out = []
    for t in tranches:
        message = common_pb2.Tranche(amount_fen=t.amount_fen)
        message.releases_at.FromDatetime(t.releases_at)
        out.append(message)
    return out


def _tranches(requested: Sequence[common_pb2.Tranche], now: datetime) -> tuple[domain.Tranche, ...]:
    """A schedule's times, bounded once here: each given, from 2000 to ten years ahead."""
    if len(requested) > domain.MAX_TRANCHES:
        raise InvalidArgument(
            "INVALID_TRANCHES", f"tranches: at most {domain.MAX_TRANCHES}", field="tranches"
        )
    out = []
    for t in requested:
        # validate.timestamp: a Timestamp beyond a datetime is the caller's INVALID_TIME
        # (ToDatetime's ValueError answered INTERNAL: found by make fuzz).
        at = validate.timestamp("tranches", t.releases_at) if t.HasField("releases_at") else None
        if at is None or not EARLIEST_TRANCHE <= at <= now + TRANCHE_HORIZON:
            raise InvalidArgument(
                "INVALID_TRANCHES",
                "tranches: every releases_at given, from 2000 to ten years from now",
                field="tranches",
            )
        out.append(domain.Tranche(t.amount_fen, at))
    return tuple(out)


def _proposal(p: domain.FundingProposal, pool: Pool | None) -> ledger_pb2.FundingProposal:
    out = ledger_pb2.FundingProposal(
        proposal_id=p.proposal_id,
        pool_id=p.pool_id,
        amount_fen=p.amount_fen,
        source=p.source,
        status=p.status,
        proposed_by=p.proposed_by,
        approved_by=p.approved_by,
        platform_ids=p.platform_ids,
        tranches=_tranches_pb(p.tranches),
        shards=p.shards,
    )
    if pool is not None:
        out.pool.CopyFrom(_pool(pool))
    return out


def _paid_amount(fen: int) -> int:
    """A declared paid amount: 0 (all of it subsidised) up to the largest price, in fen."""
    if fen < 0 or fen > MAX_PRICE_FEN:
        raise InvalidArgument(
            "INVALID_AMOUNT",
            f"paid_amount_fen: must be 0..{MAX_PRICE_FEN} fen",
            field="paid_amount_fen",
        )
    return fen


def _reservation(row: dict[str, Any]) -> ledger_pb2.Reservation:
    order_id, item = order_line.split_line(row["order_id"])
    out = ledger_pb2.Reservation(
        order_id=order_id,
        item=item,
        status=row["status"],
        subsidy_fen=row["subsidy_fen"],
        policy_version=row["policy_version"],
        pool_id=row["pool_id"],
        category=row["category"],
        qualification_id=row["qualification_id"],
        release_reason=row["release_reason"],
        sources=[common_pb2.SourceAmount(source=s, fen=fen) for s, fen in row["sources"]],
        payment_ref=row["payment_ref"],
        paid_amount_fen=row["paid_amount_fen"],
        capture_flag=row["capture_flag"],
    )
    expires: datetime = row["expires_at"]
    out.expires_at.FromDatetime(expires)
    return out


def _batch(row: dict[str, Any]) -> ledger_pb2.SettlementBatch:
    out = ledger_pb2.SettlementBatch(
        batch_id=row["batch_id"],
        merchant_id=row["merchant_id"],
        status=row["status"],
        lines=[ev.SettlementLine(order_id=o, subsidy_fen=fen) for o, fen in row["lines"]],
        clawbacks=[ev.ClawbackLine(order_id=o, fen=fen) for o, fen in row["clawbacks"]],
        gross_fen=row["gross_fen"],
        clawback_fen=row["clawback_fen"],
        net_fen=row["net_fen"],
        created_by=row["created_by"],
        approved_by=row["approved_by"],
        payment_ref=row["payment_ref"],
    )
    out.period_from.FromDatetime(row["period_from"])
    out.period_to.FromDatetime(row["period_to"])
    return out


MAX_LIST = 1000


def _returns_cursor(cursor: str) -> tuple[datetime, str] | None:
    """ListReturns' cursor (``refunded_at|order_id`` of the last refund of the page before)."""
    if not cursor:
        return None
    at, _, order_id = cursor.partition("|")
    try:
        when = datetime.fromisoformat(at) if len(cursor) <= 128 else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or not order_id:
        raise InvalidArgument(
            "INVALID_CURSOR", "cursor: a next_cursor of ListReturns", field="cursor"
        )
    return when, validate.identifier("cursor", order_id)


def _limit(limit: int) -> int:
    """A list's size: 1..MAX_LIST, 0 for the default of 100."""
    limit = limit or 100
    if not 0 < limit <= MAX_LIST:
        raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_LIST}", field="limit")
    return limit


def _required_time(field: str, request: Any) -> datetime:
    if not request.HasField(field):
        raise InvalidArgument("MISSING_FIELD", f"{field}: required", field=field)
    return validate.timestamp(field, getattr(request, field))


class LedgerApi(ReconciliationApi, FundReportsApi, ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def ProposeFunding(
        self, request: ledger_pb2.ProposeFundingRequest, context: ServicerContext
    ) -> ledger_pb2.FundingProposal:
        pool_id = validate.identifier("pool_id", request.pool_id)
        source = validate.text_field("source", request.source or "district", max_len=64)
        key = request.idempotency_key
        if key:
            validate.identifier("idempotency_key", key, max_len=128)
        tranches = _tranches(request.tranches, self.ledger.clock())
        # The amount and its schedule, before any I/O (the source is the policy's: in the use
        # case).
        domain.fund(Pool(pool_id), request.amount_fen, source, tranches)
        shards = domain.check_shard_count(request.shards)
        reason = validate.text_field("reason", request.reason, max_len=500, required=False)
        cmd = domain.ProposeFunding(
            proposal_id=f"fp-{key}" if key else f"fp-{uuid.uuid4().hex}",
            pool_id=pool_id,
            amount_fen=request.amount_fen,
            source=source,
            idempotency_key=key,
            ceiling_fen=self.ledger.funding_ceiling_fen,
            platform_ids=tuple(
                validate.identifier("platform_ids", p) for p in sorted(set(request.platform_ids))
            ),
            tranches=tranches,
            shards=shards,
        )
        proposal, pool = await self.ledger.propose_funding(cmd, caller().actor(reason))
        return _proposal(proposal, pool)

    async def ApproveFunding(
        self, request: ledger_pb2.ApproveFundingRequest, context: ServicerContext
    ) -> ledger_pb2.FundingProposal:
        proposal_id = validate.identifier("proposal_id", request.proposal_id, max_len=200)
        reason = validate.text_field("reason", request.reason, max_len=500, required=False)
        who = caller()
        cmd = domain.ApproveFunding(proposal_id, who.name, self.ledger.funding_ceiling_fen)
        proposal, pool = await self.ledger.approve_funding(cmd, who.actor(reason))
        return _proposal(proposal, pool)

    async def GetFundingProposal(
        self, request: ledger_pb2.GetFundingProposalRequest, context: ServicerContext
    ) -> ledger_pb2.FundingProposal:
        proposal_id = validate.identifier("proposal_id", request.proposal_id, max_len=200)
        return _proposal(*await self.ledger.funding_proposal(proposal_id))

    async def GetBudget(
        self, request: ledger_pb2.GetBudgetRequest, context: ServicerContext
    ) -> ledger_pb2.BudgetPool:
        pool_id = validate.identifier("pool_id", request.pool_id)
        return _status(await self.ledger.budget_status(pool_id, scope()))

    async def ReserveSubsidy(
        self, request: ledger_pb2.ReserveSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        order_id = validate.identifier("order_id", request.order_id)
        item = validate.item("item", request.item, order_id)
        cmd = domain.Reserve(
            order_id=order_line.line_of(order_id, item),
            platform_id=own_platform("platform_id", request.platform_id),
            pool_id=validate.identifier("pool_id", request.pool_id),
            consumer_id=validate.identifier("consumer_id", request.consumer_id),
            qualification_id=validate.identifier("qualification_id", request.qualification_id),
            sku=validate.identifier("sku", request.sku),
            unit_price_fen=validate.price_fen("unit_price_fen", request.unit_price_fen),
            serial=validate.serial("serial", request.serial) if request.serial else "",
            item=item,
        )
        circumstances = circumstances_of(request.circumstances)
        row = await self.ledger.reserve(cmd, caller().actor(), circumstances)
        return _reservation(row)

    async def CaptureSubsidy(
        self, request: ledger_pb2.CaptureSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        payment_ref = validate.text_field(
            "payment_ref", request.payment_ref, max_len=128, required=False
        )
        order_id = validate.identifier("order_id", request.order_id)
        item = validate.item("item", request.item, order_id)
        paid = (
            _paid_amount(request.paid_amount_fen) if request.HasField("paid_amount_fen") else None
        )
        return _reservation(
            await self.ledger.capture(order_id, payment_ref, caller().actor(), scope(), paid, item)
        )

    async def ReleaseSubsidy(
        self, request: ledger_pb2.ReleaseSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        reason = validate.choice("reason", request.reason, ("CANCELLED", "REFUNDED"))
        order_id = validate.identifier("order_id", request.order_id)
        item = validate.item("item", request.item, order_id)
        return _reservation(
            await self.ledger.release(order_id, reason, caller().actor(), scope(), item)
        )

    async def GetReservation(
        self, request: ledger_pb2.GetReservationRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        order_id = validate.identifier("order_id", request.order_id)
        item = validate.item("item", request.item, order_id)
        key = await self.ledger.locate(order_id, item, scope())
        row = await self.ledger.get_reservation(key, scope())
        if row is None:
            raise NotFound("UNKNOWN_ORDER", "order_id: no reservation", field="order_id")
        return _reservation(row)

    # -- settlement ---------------------------------------------------------------------------
    async def RecordEvidence(
        self, request: ledger_pb2.RecordEvidenceRequest, context: ServicerContext
    ) -> ledger_pb2.OrderEvidence:
        order_id = validate.identifier("order_id", request.order_id)
        item = validate.item("item", request.item, order_id)
        cmd = sd.RecordEvidence(
            order_id=await self.ledger.locate(order_id, item, scope()),
            kind=validate.choice("kind", request.kind, sd.EVIDENCE_KINDS),
            reference=validate.text_field("reference", request.reference, max_len=128),
            serial=validate.serial("serial", request.serial) if request.serial else "",
            evidenced_at=(
                validate.timestamp("evidenced_at", request.evidenced_at)
                if request.HasField("evidenced_at")
                else None
            ),
        )
        row = await self.ledger.record_evidence(cmd, caller().actor(), scope())
        order_id, item = order_line.split_line(row["order_id"])
        return ledger_pb2.OrderEvidence(
            order_id=order_id,
            item=item,
            merchant_id=row["merchant_id"],
            kind=row["kind"],
            reference=row["reference"],
            serial=row["serial"],
        )

    async def CreateSettlementBatch(
        self, request: ledger_pb2.CreateSettlementBatchRequest, context: ServicerContext
    ) -> ledger_pb2.SettlementBatch:
        cmd = sd.CreateBatch(
            batch_id=validate.identifier("batch_id", request.batch_id),
            merchant_id=validate.identifier("merchant_id", request.merchant_id),
            period_from=_required_time("period_from", request),
            period_to=_required_time("period_to", request),
        )
        reason = validate.text_field("reason", request.reason, max_len=500, required=False)
        return _batch(await self.ledger.create_batch(cmd, caller().actor(reason)))

    async def ApproveSettlementBatch(
        self, request: ledger_pb2.ApproveSettlementBatchRequest, context: ServicerContext
    ) -> ledger_pb2.SettlementBatch:
        batch_id = validate.identifier("batch_id", request.batch_id)
        reason = validate.text_field("reason", request.reason, max_len=500, required=False)
        return _batch(await self.ledger.approve_batch(batch_id, caller().actor(reason)))

    async def MarkSettlementBatchPaid(
        self, request: ledger_pb2.MarkSettlementBatchPaidRequest, context: ServicerContext
    ) -> ledger_pb2.SettlementBatch:
        batch_id = validate.identifier("batch_id", request.batch_id)
        payment_ref = validate.text_field("payment_ref", request.payment_ref, max_len=128)
        row = await self.ledger.mark_batch_paid(batch_id, payment_ref, caller().actor())
        return _batch(row)

    async def GetSettlementBatch(
        self, request: ledger_pb2.GetSettlementBatchRequest, context: ServicerContext
    ) -> ledger_pb2.SettlementBatch:
        batch_id = validate.identifier("batch_id", request.batch_id)
        return _batch(await self.ledger.settlement_batch(batch_id))

    async def ListSettlementBatches(
        self, request: ledger_pb2.ListSettlementBatchesRequest, context: ServicerContext
    ) -> ledger_pb2.ListSettlementBatchesResponse:
        merchant = (
            validate.identifier("merchant_id", request.merchant_id) if request.merchant_id else ""
        )
        after = validate.identifier("cursor", request.cursor) if request.cursor else ""
        limit = _limit(request.limit)
        rows = await self.ledger.settlement_batches(merchant, after, limit)
        out = ledger_pb2.ListSettlementBatchesResponse(batches=[_batch(row) for row in rows])
        if len(rows) == limit:  # perhaps more: the next page starts after the last batch id
            out.next_cursor = str(rows[-1]["batch_id"])
        return out

    async def ListOverdueEvidence(
        self, request: ledger_pb2.ListOverdueEvidenceRequest, context: ServicerContext
    ) -> ledger_pb2.ListOverdueEvidenceResponse:
        merchant = (
            validate.identifier("merchant_id", request.merchant_id) if request.merchant_id else ""
        )
        after = sd.cursor_of(request.page_token)
        rows, cursor = await self.ledger.overdue_evidence(merchant, _limit(request.limit), after)
        out = ledger_pb2.ListOverdueEvidenceResponse(next_page_token=sd.page_token(cursor))
        for row in rows:
            order_id, line_item = order_line.split_line(row["order_id"])
            item = out.captures.add(
                order_id=order_id,
                item=line_item,
                merchant_id=row["merchant_id"],
                platform_id=row["platform_id"],
                subsidy_fen=row["subsidy_fen"],
                policy_version=row["policy_version"],
            )
            item.captured_at.FromDatetime(row["captured_at"])
            item.due_at.FromDatetime(row["due_at"])
        return out

    async def ListReturns(
        self, request: ledger_pb2.ListReturnsRequest, context: ServicerContext
    ) -> ledger_pb2.ListReturnsResponse:
        merchant = (
            validate.identifier("merchant_id", request.merchant_id) if request.merchant_id else ""
        )
        limit = _limit(request.limit)
        rows = await self.ledger.returns(merchant, limit, _returns_cursor(request.cursor))
        out = ledger_pb2.ListReturnsResponse()
        if len(rows) == limit:  # perhaps more: the next page starts after the last refund
            out.next_cursor = f"{rows[-1]['refunded_at'].isoformat()}|{rows[-1]['order_id']}"
        for row in rows:
            clawback = (
                "NONE"
                if row["clawback_fen"] is None
                else "DEDUCTED"
                if row["deducted_by"]
                else "OUTSTANDING"
            )
            order_id, line_item = order_line.split_line(row["order_id"])
            item = out.returns.add(
                order_id=order_id,
                item=line_item,
                merchant_id=row["merchant_id"],
                platform_id=row["platform_id"],
                sku=row["sku"],
                subsidy_fen=row["subsidy_fen"],
                batch_id=row["batch_id"] or "",
                clawback=clawback,
                deducted_by=row["deducted_by"] or "",
            )
            item.captured_at.FromDatetime(row["captured_at"])
            item.refunded_at.FromDatetime(row["refunded_at"])
        return out
