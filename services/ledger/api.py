"""The ledger's gRPC servicer: validate, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.contract.budget import Pool
from services.kernel.rpc import ServicerContext
from subsidy.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from subsidy.v1 import events_pb2 as ev

from .handlers import Ledger


def _pool(p: Pool) -> ledger_pb2.BudgetPool:
    return ledger_pb2.BudgetPool(
        pool_id=p.pool_id,
        funded_fen=p.funded,
        available_fen=p.available,
        reserved_fen=p.reserved,
        spent_fen=p.spent,
    )


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


def _actor(actor: common_pb2.Actor, platform_id: str = "") -> common_pb2.Actor:
    if actor.kind:
        return actor
    return common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id=platform_id or "unknown")


class LedgerApi(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def FundBudget(
        self, request: ledger_pb2.FundBudgetRequest, context: ServicerContext
    ) -> ledger_pb2.BudgetPool:
        actor = (
            request.actor
            if request.actor.kind
            else common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="unknown")
        )
        pool = await self.ledger.fund(
            request.pool_id,
            request.amount_fen,
            request.source or "district",
            request.idempotency_key,
            actor,
        )
        return _pool(pool)

    async def GetBudget(
        self, request: ledger_pb2.GetBudgetRequest, context: ServicerContext
    ) -> ledger_pb2.BudgetPool:
        return _pool(await self.ledger.get_pool(request.pool_id))

    async def ReserveSubsidy(
        self, request: ledger_pb2.ReserveSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        req = ev.SubsidyReserved(
            order_id=request.order_id,
            pool_id=request.pool_id,
            platform_id=request.platform_id,
            consumer_id=request.consumer_id,
            qualification_id=request.qualification_id,
            sku=request.sku,
            unit_price_fen=request.unit_price_fen,
        )
        row = await self.ledger.reserve(
            req, request.serial, _actor(request.actor, request.platform_id)
        )
        return _reservation(row)

    async def CaptureSubsidy(
        self, request: ledger_pb2.CaptureSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        return _reservation(
            await self.ledger.capture(request.order_id, request.payment_ref, _actor(request.actor))
        )

    async def ReleaseSubsidy(
        self, request: ledger_pb2.ReleaseSubsidyRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        return _reservation(
            await self.ledger.release(request.order_id, request.reason, _actor(request.actor))
        )

    async def GetReservation(
        self, request: ledger_pb2.GetReservationRequest, context: ServicerContext
    ) -> ledger_pb2.Reservation:
        from services.kernel import validate
        from services.kernel.errors import NotFound

        validate.identifier("order_id", request.order_id)
        row = await self.ledger.get_reservation(request.order_id)
        if row is None:
            raise NotFound("UNKNOWN_ORDER", "order_id: no reservation", field="order_id")
        return _reservation(row)
