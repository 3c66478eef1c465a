"""The eligibility gRPC servicer: the edge, where every request field is validated once and
the actor is settled; the use cases in handlers.py receive clean, canonical values."""

from __future__ import annotations

from collections.abc import Callable

from services.kernel import validate
from services.kernel.contract import personal_data
from services.kernel.errors import InvalidArgument
from services.kernel.identity import caller, own_platform, scope
from services.kernel.riskscreen import circumstances_of
from services.kernel.rpc import ServicerContext
from subsidy.v1 import eligibility_pb2, eligibility_pb2_grpc

from .domain import Qualification
from .handlers import Eligibility


def _qualification(q: Qualification) -> eligibility_pb2.Qualification:
    out = eligibility_pb2.Qualification(
        qualification_id=q.qualification_id,
        consumer_id=q.consumer_id,
        category=q.category,
        channel=q.channel,
        status=q.status,
        order_id=q.order_id,
    )
    out.expires_at.FromDatetime(q.expires_at)
    return out


def _personal(field: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except personal_data.InvalidIdentity as exc:
        raise InvalidArgument(exc.reason, f"{field}: {exc}", field=field) from None


class EligibilityApi(eligibility_pb2_grpc.EligibilityServiceServicer):
    def __init__(self, eligibility: Eligibility) -> None:
        self.e = eligibility

    async def RegisterConsumer(
        self, request: eligibility_pb2.RegisterConsumerRequest, context: ServicerContext
    ) -> eligibility_pb2.Consumer:
        name = _personal("name", request.name, personal_data.validate_name)
        id_number = _personal("id_number", request.id_number, personal_data.validate_id_number)
        phone = _personal("phone", request.phone, personal_data.validate_phone)
        platform_id = own_platform("platform_id", request.platform_id)
        row, existed = await self.e.register(
            name,
            id_number,
            phone,
            platform_id,
            caller().actor(),
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
        consumer_id = validate.identifier("consumer_id", request.consumer_id)
        category = validate.identifier("category", request.category)
        channel = own_platform("channel", request.channel)
        circumstances = circumstances_of(request.circumstances)  # RISK: validated, canonical
        q = await self.e.claim(consumer_id, category, channel, caller().actor(), circumstances)
        return _qualification(q)

    async def GetQualification(
        self, request: eligibility_pb2.GetQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        qid = validate.identifier("qualification_id", request.qualification_id)
        return _qualification(await self.e.qualification(qid, scope()))

    async def LockQualification(
        self, request: eligibility_pb2.LockQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        order_id = validate.identifier("order_id", request.order_id)
        consumer_id = validate.identifier("consumer_id", request.consumer_id)
        category = validate.identifier("category", request.category)
        platform_id = own_platform("platform_id", request.platform_id)
        qid = validate.identifier("qualification_id", request.qualification_id)
        q = await self.e.lock(
            qid,
            order_id,
            category,
            consumer_id,
            caller().actor(),
            platform_id=platform_id,
        )
        return _qualification(q)

    async def ConsumeQualification(
        self,
        request: eligibility_pb2.ConsumeQualificationRequest,
        context: ServicerContext,
    ) -> eligibility_pb2.Qualification:
        # Payment is recorded by the ledger; its SubsidyCaptured event marks the qualification
        # used. This read lets a caller see the outcome for that order.
        order_id = validate.identifier("order_id", request.order_id)
        qid = validate.identifier("qualification_id", request.qualification_id)
        q = await self.e.consumed(qid, order_id, scope())
        return _qualification(q)
