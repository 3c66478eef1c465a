"""The eligibility gRPC servicer."""

from __future__ import annotations

from datetime import datetime

from services.kernel.rpc import ServicerContext
from subsidy.v1 import common_pb2, eligibility_pb2, eligibility_pb2_grpc

from .handlers import Eligibility


def _qualification(row: dict[str, object]) -> eligibility_pb2.Qualification:
    out = eligibility_pb2.Qualification(
        qualification_id=str(row["qualification_id"]),
        consumer_id=str(row["consumer_id"]),
        category=str(row["category"]),
        channel=str(row["channel"]),
        status=str(row["status"]),
        order_id=str(row["order_id"]),
    )
    expires = row["expires_at"]
    assert isinstance(expires, datetime)
    out.expires_at.FromDatetime(expires)
    return out


def _actor(actor: common_pb2.Actor, kind: int = common_pb2.Actor.KIND_PLATFORM) -> common_pb2.Actor:
    return actor if actor.kind else common_pb2.Actor(kind=kind, id="unknown")  # type: ignore[arg-type]


class EligibilityApi(eligibility_pb2_grpc.EligibilityServiceServicer):
    def __init__(self, eligibility: Eligibility) -> None:
        self.e = eligibility

    async def RegisterConsumer(
        self, request: eligibility_pb2.RegisterConsumerRequest, context: ServicerContext
    ) -> eligibility_pb2.Consumer:
        actor = (
            request.actor
            if request.actor.kind
            else common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id=request.platform_id)
        )
        row, existed = await self.e.register(
            request.name, request.id_number, request.phone, request.platform_id, actor
        )
        return eligibility_pb2.Consumer(
            consumer_id=str(row["consumer_id"]),
            id_number_masked=str(row["id_number_masked"]),
            phone_masked=str(row["phone_masked"]),
            already_registered=existed,
        )

    async def ClaimQualification(
        self, request: eligibility_pb2.ClaimQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        row = await self.e.claim(
            request.consumer_id, request.category, request.channel, _actor(request.actor)
        )
        return _qualification(row)

    async def GetQualification(
        self, request: eligibility_pb2.GetQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        return _qualification(await self.e.qualification(request.qualification_id))

    async def LockQualification(
        self, request: eligibility_pb2.LockQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        row = await self.e.lock(
            request.qualification_id,
            request.order_id,
            request.category,
            request.consumer_id,
            _actor(request.actor),
            platform_id=request.platform_id,
        )
        return _qualification(row)

    async def ConsumeQualification(
        self,
        request: eligibility_pb2.ConsumeQualificationRequest,
        context: ServicerContext,
    ) -> eligibility_pb2.Qualification:
        # Payment is recorded by the ledger; its SubsidyCaptured event marks the qualification
        # used. This read lets a caller see the outcome for that order.
        row = await self.e.consumed(request.qualification_id, request.order_id)
        return _qualification(row)
