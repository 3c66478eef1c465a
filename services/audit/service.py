"""How audit is wired into the shared service runner: one consumer of every event."""

from __future__ import annotations

from services.kernel.app import Runtime, ServiceSpec, Wiring
from services.kernel.consumer import EventConsumer
from subsidy.v1 import audit_pb2, audit_pb2_grpc

from . import log
from .api import AuditApi


async def build(rt: Runtime) -> Wiring:
    await log.ensure_head(rt.store)
    return Wiring(
        registrations=[(audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditApi(rt.store))],
        service_names=[audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name],
        consumers=[EventConsumer("audit-log", ["events.>"], log.append)],
    )


SPEC = ServiceSpec(name="audit", metadata=log.metadata, build=build)
