"""How eligibility is wired into the shared service runner."""

from __future__ import annotations

from services.kernel.app import Runtime, ServiceSpec, Wiring
from services.kernel.consumer import EventConsumer
from subsidy.v1 import (
    eligibility_pb2,
    eligibility_pb2_grpc,
    identity_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from . import erasures
from .api import EligibilityApi
from .authority import GrpcIdentityAuthority
from .handlers import Eligibility
from .projections import metadata
from .risk_api import RiskApi
from .usage import UsageApi


async def build(rt: Runtime) -> Wiring:
    authority_ch = rt.channel("identity_authority")
    e = Eligibility(
        rt.store,
        rt.vault,
        GrpcIdentityAuthority(identity_pb2_grpc.IdentityAuthorityStub(authority_ch)),
        identity_attempts_per_day=rt.settings.identity_attempts_per_day,
        sweep_every_s=rt.settings.expiry_sweep_s,
    )

    async def ready() -> None:
        await e.policies.wait()
        await e.risk.active.refresh()  # the rules and lists in force, before the first claim
        # Erasures a restored backup predates, erased again before anything is served.
        await erasures.reapply(e.persons, rt.vault, rt.store)

    return Wiring(
        registrations=[
            (eligibility_pb2_grpc.add_EligibilityServiceServicer_to_server, EligibilityApi(e)),
            (risk_pb2_grpc.add_RiskServiceServicer_to_server, RiskApi(e.risk)),
            # What the auditor's replay compares the events with (read-only).
            (usage_pb2_grpc.add_UsageServiceServicer_to_server, UsageApi(rt.store)),
        ],
        service_names=[
            eligibility_pb2.DESCRIPTOR.services_by_name["EligibilityService"].full_name,
            risk_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name,
            usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
        ],
        consumers=[
            EventConsumer(
                "eligibility-policies",
                ["events.catalog.PolicyPublished"],
                e.policies.on_policy_published,
            ),
            EventConsumer(
                "eligibility-ledger",
                [
                    "events.ledger.SubsidyCaptured",
                    "events.ledger.SubsidyReleased",
                    "events.ledger.ReservationRefused",
                ],
                e.on_ledger_event,
            ),
            # The ledger's blocks and flags, for the one list of decisions operators review.
            EventConsumer(
                "eligibility-risk",
                ["events.ledger.RiskDecisionRecorded"],
                e.risk.on_ledger_decision,
            ),
        ],
        on_close=[authority_ch.close],
        # Every replica polls its copy of the risk rules and lists (a change is in force on
        # each within a second); the sweeper expires qualifications past their validity.
        background=[e.risk.active.run],
        singular=[e.expiry_loop],  # one worker of several at a time
        ready=ready,
    )


# Its peer (the identity authority) is declared in services/kernel/topology.py.
SPEC = ServiceSpec(name="eligibility", metadata=metadata, build=build)
