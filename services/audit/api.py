"""The audit gRPC servicer: how many entries, and the entries themselves."""

from __future__ import annotations

from services.kernel.errors import InvalidArgument
from services.kernel.eventstore import EventStore
from services.kernel.rpc import ServicerContext
from subsidy.v1 import audit_pb2, audit_pb2_grpc
from subsidy.v1 import events_pb2 as ev

from . import log


class AuditApi(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def GetLogInfo(
        self, request: audit_pb2.GetLogInfoRequest, context: ServicerContext
    ) -> audit_pb2.LogInfo:
        size, chained, by_service = await log.info(self.store)
        return audit_pb2.LogInfo(
            size=size, head_hash_hex=chained.hex(), entries_by_service=by_service
        )

    async def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        if request.start < 0:
            raise InvalidArgument("INVALID_START", "start: must be ≥ 0", field="start")
        if not 1 <= request.limit <= 1000:
            raise InvalidArgument("INVALID_LIMIT", "limit: 1..1000", field="limit")
        rows = await log.read(self.store, request.start, request.limit)
        return audit_pb2.GetEntriesResponse(
            entries=[
                audit_pb2.AuditEntry(
                    index=idx,
                    leaf_hash_hex=leaf.hex(),
                    chain_hash_hex=chained.hex(),
                    envelope=ev.EventEnvelope.FromString(data),
                )
                for idx, leaf, chained, data in rows
            ]
        )
