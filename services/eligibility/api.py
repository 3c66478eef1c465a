"""The eligibility gRPC servicer: the edge, where every request field is validated once and
the actor is settled; the use cases in handlers.py receive clean, canonical values."""

from __future__ import annotations

from collections.abc import Callable

from services.kernel import validate
from services.kernel.contract import circumstances, order_line, personal_data
from services.kernel.errors import InvalidArgument
from services.kernel.identity import caller, own_platform, scope
from services.kernel.riskscreen import circumstances_of
from services.kernel.rpc import ServicerContext
from subsidy.v1 import eligibility_pb2, eligibility_pb2_grpc

from .domain import Qualification
from .handlers import Eligibility
from .linking import Kind


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
    if q.available_from is not None:
        out.available_from.FromDatetime(q.available_from)
    return out


def _personal(field: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except personal_data.InvalidIdentity as exc:
        raise InvalidArgument(exc.reason, f"{field}: {exc}", field=field) from None


# The Identifiers fields, their kinds and the contract's validators (each returns the canonical
# form the blind index is taken over); an empty field is one the platform does not have.
_IDENTIFIER_FIELDS: tuple[tuple[str, Kind, Callable[[str], str]], ...] = (
    ("device_id", Kind.DEVICE, circumstances.validate_device_id),
    ("bank_phone", Kind.BANK_PHONE, personal_data.validate_phone),
    ("bank_card", Kind.BANK_CARD, circumstances.validate_bank_card),
    ("app_account", Kind.APP_ACCOUNT, circumstances.validate_app_account),
)


def _identifiers(
    given: eligibility_pb2.Identifiers, field: str, *, required: bool = False
) -> list[tuple[Kind, str]]:
    """The identifiers a request carries, validated and canonical, in a fixed order."""
    found = [
        (kind, _personal(f"{field}.{name}", getattr(given, name), check))
        for name, kind, check in _IDENTIFIER_FIELDS
        if getattr(given, name)
    ]
    if required and not found:
        raise InvalidArgument("MISSING_FIELD", f"{field}: at least one identifier", field=field)
    return found


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
        identifiers = _identifiers(request.identifiers, "identifiers")
        row, existed = await self.e.register(
            name,
            id_number,
            phone,
            platform_id,
            caller().actor(),
            identifiers,
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
        # The ledger's reservation key: an order, or order_id/item for one item of it.
        order_id = validate.line("order_id", request.order_id)
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
        item = validate.item("item", request.item, order_id)
        qid = validate.identifier("qualification_id", request.qualification_id)
        q = await self.e.consumed(qid, order_line.line_of(order_id, item), scope())
        return _qualification(q)

    # -- same user ------------------------------------------------------------------------
    async def AddIdentifiers(
        self, request: eligibility_pb2.AddIdentifiersRequest, context: ServicerContext
    ) -> eligibility_pb2.AddIdentifiersResponse:
        consumer_id = validate.identifier("consumer_id", request.consumer_id)
        platform_id = own_platform("platform_id", request.platform_id)
        values = _identifiers(request.identifiers, "identifiers", required=True)
        kept = await self.e.persons.add_identifiers(
            consumer_id, platform_id, values, caller().actor()
        )
        return eligibility_pb2.AddIdentifiersResponse(
            consumer_id=consumer_id,
            identifiers=[
                eligibility_pb2.MaskedIdentifier(kind=i.kind, masked=i.masked) for i in kept
            ],
        )

    async def GetPerson(
        self, request: eligibility_pb2.GetPersonRequest, context: ServicerContext
    ) -> eligibility_pb2.Person:
        consumer_id = validate.identifier("consumer_id", request.consumer_id)
        found = await self.e.persons.explain(consumer_id, await self.e.policies.in_force())
        return eligibility_pb2.Person(
            person_id=found.person_id,
            consumers=[
                eligibility_pb2.PersonConsumer(
                    consumer_id=m.consumer_id,
                    platform_ids=m.platform_ids,
                    erased=m.erased,
                    id_number_masked=m.id_number_masked,
                    phone_masked=m.phone_masked,
                )
                for m in found.consumers
            ],
            links=[
                eligibility_pb2.PersonLink(
                    consumer_id=link.consumer_id,
                    kind=link.kind,
                    linked_consumer_id=link.linked_consumer_id,
                    linked_kind=link.linked_kind,
                    masked=link.masked,
                )
                for link in found.links
            ],
            held_when_linked=[
                eligibility_pb2.CategoryHeld(category=c, count=n)
                for c, n in sorted(found.held_when_linked.items())
            ],
        )

    async def EraseConsumer(
        self, request: eligibility_pb2.EraseConsumerRequest, context: ServicerContext
    ) -> eligibility_pb2.ConsumerErasure:
        consumer_id = validate.identifier("consumer_id", request.consumer_id)
        reason = validate.text_field("reason", request.reason)
        when = await self.e.persons.erase(consumer_id, reason, caller().actor(reason))
        out = eligibility_pb2.ConsumerErasure(consumer_id=consumer_id)
        out.erased_at.FromDatetime(when)
        return out

    async def RestoreQualification(
        self, request: eligibility_pb2.CaseQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        qid, case_id, reason = _case_request(request)
        return _qualification(await self.e.restore_by_case(qid, case_id, caller().actor(reason)))

    async def ForfeitQualification(
        self, request: eligibility_pb2.CaseQualificationRequest, context: ServicerContext
    ) -> eligibility_pb2.Qualification:
        qid, case_id, reason = _case_request(request)
        return _qualification(await self.e.forfeit_by_case(qid, case_id, caller().actor(reason)))


def _case_request(request: eligibility_pb2.CaseQualificationRequest) -> tuple[str, str, str]:
    """A case outcome's qualification, case and reason, each required and bounded."""
    return (
        validate.identifier("qualification_id", request.qualification_id),
        validate.identifier("case_id", request.case_id),
        validate.text_field("reason", request.reason),
    )
