"""How the catalog is wired into the shared service runner."""

from __future__ import annotations

from services.kernel.app import Runtime, ServiceSpec, Wiring
from services.kernel.consumer import EventConsumer
from services.kernel.contract.policy import load_policy
from subsidy.v1 import catalog_pb2, catalog_pb2_grpc

from .api import CatalogApi
from .handlers import Catalog
from .projections import LEDGER_SUBJECTS, metadata


async def build(rt: Runtime) -> Wiring:
    catalog = Catalog(rt.store)
    initial = rt.settings.initial_policy
    await catalog.ensure_default_policy(load_policy(initial) if initial else None)
    return Wiring(
        registrations=[
            (catalog_pb2_grpc.add_CatalogServiceServicer_to_server, CatalogApi(catalog))
        ],
        service_names=[catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name],
        # Sales orders and serial bindings, learnt from the ledger's reservation events.
        consumers=[EventConsumer("catalog-sales", LEDGER_SUBJECTS, catalog.on_ledger_event)],
        background=[catalog.refresh_loop],
    )


SPEC = ServiceSpec(name="catalog", metadata=metadata, build=build)
