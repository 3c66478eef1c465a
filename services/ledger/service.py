"""How the ledger is wired into the shared service runner."""

from __future__ import annotations

from functools import partial

from services.kernel.app import Runtime, ServiceSpec, Wiring
from services.kernel.consumer import EventConsumer
from subsidy.v1 import catalog_pb2_grpc, eligibility_pb2_grpc, ledger_pb2, ledger_pb2_grpc

from .api import LedgerApi
from .handlers import Ledger
from .projections import SHARDED_GAUGES, metadata


async def build(rt: Runtime) -> Wiring:
    s = rt.settings
    catalog_ch = rt.channel("catalog")
    eligibility_ch = rt.channel("eligibility")
    ledger = Ledger(
        rt.store,
        catalog_pb2_grpc.CatalogServiceStub(catalog_ch),
        eligibility_pb2_grpc.EligibilityServiceStub(eligibility_ch),
        reservation_timeout_s=s.reservation_timeout_s,
        abandon_after_s=s.abandon_after_s,
        funding_ceiling_fen=s.funding_ceiling_fen,
        keys=rt.vault,
    )

    async def ready() -> None:
        await ledger.risk.active.refresh()  # the rules and lists in force, before any order

    return Wiring(
        registrations=[(ledger_pb2_grpc.add_LedgerServiceServicer_to_server, LedgerApi(ledger))],
        service_names=[ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name],
        # The risk rules and lists eligibility owns, into the ledger's own copy: one subject
        # per consumer, so the ledger's NATS user may create consumers on eligibility's
        # events only (services/kernel/natsauth.py: BOUND_CONSUMERS_ONLY).
        consumers=[
            EventConsumer(
                "ledger-risk-rules",
                ["events.eligibility.RiskRulesActivated"],
                ledger.risk.on_eligibility_event,
            ),
            EventConsumer(
                "ledger-risk-lists",
                ["events.eligibility.RiskListChanged"],
                ledger.risk.on_eligibility_event,
            ),
        ],
        # Every replica polls its copy (a change is in force on each within a second).
        # The budget gauges of sharded pools, summed from what committed (every replica:
        # each serves its own /metrics).
        background=[ledger.risk.active.run, partial(SHARDED_GAUGES.run, rt.store.engine)],
        # Expiry, abandoned attempts and tranche release: one worker of several at a time.
        singular=[ledger.expiry_loop],
        on_close=[catalog_ch.close, eligibility_ch.close],
        ready=ready,
    )


# Its peers (catalog, eligibility) are declared in services/kernel/topology.py.
SPEC = ServiceSpec(name="ledger", metadata=metadata, build=build)
