"""Every service's event store, listed read-only for the auditor (``EventLogService``).

``subsidyctl audit verify`` compares the audit log with what each store holds: an entry the
log accepted from the bus that no store wrote (a forgery), a stored event the log never got,
and an event whose bytes differ between the two. The bus cannot be the witness for itself, so
this listing comes from the store, over gRPC with mutual TLS, to callers the authorisation
table allows (the auditor and operators).

Each event is listed with the SHA-256 of its envelope's bytes exactly as the row holds them,
computed by PostgreSQL (``sha256(envelope)``): re-encoding a parsed envelope could hide a row
whose bytes were changed in a way the parser ignores, and the payload never leaves the
database. Pages follow the store's global order with the same barrier as
:meth:`EventStore.read_all`, so a reader resuming from a cursor never skips an event whose
transaction commits late.
"""

from __future__ import annotations

import re
from typing import Final

from sqlalchemy import text

from subsidy.v1 import eventlog_pb2, eventlog_pb2_grpc

from .errors import InvalidArgument
from .eventstore import READ_HORIZON, START, EventStore, Position
from .rpc import Registration, ServicerContext

SERVICE_NAME: Final = eventlog_pb2.DESCRIPTOR.services_by_name["EventLogService"].full_name
DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 1000
# A cursor is a Position as str() writes it: two non-negative 64-bit integers.
_CURSOR = re.compile(r"^([0-9]{1,20}):([0-9]{1,20})$")
_MAX_CURSOR_LEN: Final = 41

# read_all's WHERE clause (see services/kernel/eventstore.py for why it orders and stops so),
# selecting the digest and the row's columns instead of the envelope.
_PAGE = text(
    "SELECT tx_id::text::bigint, position, event_id, stream_id, stream_version, event_type, "
    "encode(sha256(envelope), 'hex') FROM events "
    "WHERE (tx_id, position) > (CAST(CAST(:tx AS text) AS xid8), :pos) "
    f"AND tx_id < {READ_HORIZON} "
    "ORDER BY tx_id, position LIMIT :limit"
)


def cursor_of(value: str) -> Position:
    """The position a cursor names (``""`` is the start); INVALID_ARGUMENT otherwise."""
    if not value:
        return START
    match = _CURSOR.fullmatch(value) if len(value) <= _MAX_CURSOR_LEN else None
    if match is None or max(int(match[1]), int(match[2])) >= 2**63:
        raise InvalidArgument(
            "INVALID_CURSOR", "cursor: a next_cursor this service returned", field="cursor"
        )
    return Position(int(match[1]), int(match[2]))


def page_limit(value: int) -> int:
    """How many events one page holds: 1..MAX_LIMIT, 0 for the default."""
    if value == 0:
        return DEFAULT_LIMIT
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidArgument("INVALID_LIMIT", f"limit: 1..{MAX_LIMIT}", field="limit")
    return value


async def list_events(
    store: EventStore, after: Position, limit: int
) -> tuple[list[eventlog_pb2.StoredEvent], Position]:
    """Up to ``limit`` events after ``after`` in the global order, and where the page ends."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(_PAGE, {"tx": after.tx_id, "pos": after.position, "limit": limit})
        ).all()
    events = [
        eventlog_pb2.StoredEvent(
            event_id=r[2],
            stream_id=r[3],
            stream_version=int(r[4]),
            event_type=r[5],
            sha256_hex=r[6],
        )
        for r in rows
    ]
    end = Position(int(rows[-1][0]), int(rows[-1][1])) if rows else after
    return events, end


class EventLogApi(eventlog_pb2_grpc.EventLogServiceServicer):
    """``EventLogService`` for one service's store."""

    def __init__(self, service: str, store: EventStore) -> None:
        self.service = service
        self.store = store

    async def ListEvents(
        self, request: eventlog_pb2.ListEventsRequest, context: ServicerContext
    ) -> eventlog_pb2.ListEventsResponse:
        after = cursor_of(request.cursor)
        events, end = await list_events(self.store, after, page_limit(request.limit))
        return eventlog_pb2.ListEventsResponse(
            service=self.service, events=events, next_cursor="" if end == START else str(end)
        )


def registration(service: str, store: EventStore) -> Registration:
    """What services/kernel/app.py registers on every service's server."""
    return (eventlog_pb2_grpc.add_EventLogServiceServicer_to_server, EventLogApi(service, store))
