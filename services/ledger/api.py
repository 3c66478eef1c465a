"""The ledger's gRPC servicer: the edge, where every request field is validated once and the
actor is settled; the use cases in handlers.py receive commands of clean values."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from services.kernel import validate
from services.kernel.contract.budget import Pool
from services.kernel.errors import NotFound
from services.kernel.identity import caller, own_platform, scope
from services.kernel.riskscreen import circumstances_of
from services.kernel.rpc import ServicerContext
from subsidy.v1 import ledger_pb2, ledger_pb2_grpc

from . import domain
from .handlers import Ledger
from .reconciliation_api import ReconciliationApi


def _pool(p: Pool) -> ledger_pb2.BudgetPool:
    return ledger_pb2.BudgetPool(
        pool_id=p.pool_id,
        funded_fen=p.funded,
        available_fen=p.available,
        reserved_fen=p.reserved,
        spent_fen=p.spent,
    )


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
    )
    if pool is not None:
        out.pool.CopyFrom(_pool(pool))
    return out


def _reservation(row: dict[str, Any]) -> ledger_pb2.Reservation:
    out = ledger_pb2.Reservation(
        order_id=row["order_id"],
        status=row["status"],
        subsidy_fen=row["subsidy_fen"],
        policy_version=row["policy_version"],
        pool_id=row["pool_id"],
        category=row["category"],
        qualification_id=row["qualification_id"],
        release_reason=row["release_reason"],
    )
    expires: datetime = row["expires_at"]
    out.expires_at.FromDatetime(expires)
    return out


class LedgerApi(ReconciliationApi, ledger_pb2_grpc.LedgerServiceServicer):
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
        domain.fund(Pool(pool_id), request.amount_fen, source)  # the amount, before any I/O
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
        return _pool(await self.ledger.get_pool(pool_id, scope()))

    async def ReserveSubsidy(
        self, request: ledger_pb2.ReserveSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        cmd = domain.Reserve(
            order_id=validate.identifier("order_id", request.order_id),
            platform_id=own_platform("platform_id", request.platform_id),
            pool_id=validate.identifier("pool_id", request.pool_id),
            consumer_id=validate.identifier("consumer_id", request.consumer_id),
            qualification_id=validate.identifier("qualification_id", request.qualification_id),
            sku=validate.identifier("sku", request.sku),
            unit_price_fen=validate.price_fen("unit_price_fen", request.unit_price_fen),
            serial=validate.serial("serial", request.serial) if request.serial else "",
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
        return _reservation(
            await self.ledger.capture(order_id, payment_ref, caller().actor(), scope())
        )

    async def ReleaseSubsidy(
        self, request: ledger_pb2.ReleaseSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        reason = validate.choice("reason", request.reason, ("CANCELLED", "REFUNDED"))
        order_id = validate.identifier("order_id", request.order_id)
        return _reservation(await self.ledger.release(order_id, reason, caller().actor(), scope()))

    async def GetReservation(
        self, request: ledger_pb2.GetReservationRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        order_id = validate.identifier("order_id", request.order_id)
        row = await self.ledger.get_reservation(order_id, scope())
        if row is None:
            raise NotFound("UNKNOWN_ORDER", "order_id: no reservation", field="order_id")
        return _reservation(row)
