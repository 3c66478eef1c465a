"""Event envelopes: building them, naming their types, and reading their payloads."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import symbol_database
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate

from services.invariants import check_machine_event
from subsidy.v1 import common_pb2, events_pb2

from .errors import InvalidArgument

Actor = common_pb2.Actor

# The largest envelope the store accepts: NATS refuses messages over its max_payload (1 MiB by
# default), and an event the relay cannot publish would hold back every later one. The margin
# leaves room for the headers the relay adds (message id, trace context).
MAX_ENVELOPE_BYTES = 1_000_000


class EventTooLarge(InvalidArgument):
    """An event larger than the bus accepts: refused at append, so nothing is committed and no
    input can wedge the outbox (a request that would record it fails with INVALID_ARGUMENT)."""

    def __init__(self, size: int) -> None:
        super().__init__(
            "EVENT_TOO_LARGE",
            f"the event this request would record is {size} bytes, over the {MAX_ENVELOPE_BYTES}"
            " bytes the event bus accepts",
        )


# The actors that are a person (the audit's record of every action of a person, as against a
# platform or a service).
PERSON_KINDS: Final = frozenset({Actor.KIND_OPERATOR, Actor.KIND_APPROVER, Actor.KIND_AUDITOR})
# The events only a platform or a service causes, by the service that publishes them: a
# registration, a claim and a checkout's (RegisterConsumer and ClaimQualification are a
# platform's, LockQualification the ledger's, CaptureSubsidy a platform's, and a qualification is
# used when eligibility's consumer settles the capture: services/kernel/authz.py). By far the
# most frequent events; the consumer of what persons do (audit-supervision) leaves them out of
# its filter, so every append refuses one with a person as its actor (:func:`check_actor`).
# SubsidyReserved is not here: supervision keeps each order's platform from it.
MACHINE_EVENTS: Final[Mapping[str, frozenset[str]]] = {
    "eligibility": frozenset(
        m.DESCRIPTOR.full_name
        for m in (
            events_pb2.ConsumerRegistered,
            events_pb2.QualificationClaimed,
            events_pb2.QualificationLocked,
            events_pb2.QualificationUsed,
        )
    ),
    "ledger": frozenset({events_pb2.SubsidyCaptured.DESCRIPTOR.full_name}),
}


def check_actor(env: Envelope) -> None:
    """Refuse an event of MACHINE_EVENTS whose actor is a person (the store calls this for
    every append): services.invariants.check_machine_event."""
    check_machine_event(
        env.event_type,
        by_person=env.actor.kind in PERSON_KINDS,
        machine=MACHINE_EVENTS.get(env.service, frozenset()),
    )


def check_size(env: Envelope) -> None:
    """Refuse an envelope the bus would refuse (the store calls this for every append)."""
    size = env.ByteSize()
    if size > MAX_ENVELOPE_BYTES:
        raise EventTooLarge(size)


Envelope = events_pb2.EventEnvelope

_last_ms = 0
_seq = 0


def service_tag(service: str) -> int:
    """The 8-bit tag of a service's event ids (the first byte of SHA-256 of its name)."""
    return hashlib.sha256(service.encode()).digest()[0]


def event_id_for(service: str) -> str:
    """A new event id of ``service``'s store: a UUIDv7 whose first random byte is the
    service's tag, so a consumer can tell an id another store could not have minted."""
    return str(uuid7(tag=service_tag(service)))


def belongs_to(event_id: str, service: str) -> bool:
    """Whether ``event_id`` is of ``service``'s id scheme (a UUIDv7 carrying its tag)."""
    try:
        value = uuid.UUID(event_id)
    except ValueError:
        return False
    return value.version == 7 and (value.int >> 54) & 0xFF == service_tag(service)


def uuid7(*, tag: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort roughly by creation. ``tag`` (0..255),
    when given, replaces the first byte of the random part (see :func:`event_id_for`)."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms = _last_ms
        _seq = (_seq + 1) & 0xFFF
        if _seq == 0:
            ms += 1
    else:
        _seq = int.from_bytes(os.urandom(2), "big") & 0x7FF
    _last_ms = ms
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    if tag is not None:
        rand = (rand & ~(0xFF << 54)) | ((tag & 0xFF) << 54)
    value = (ms << 80) | (0x7 << 76) | (_seq << 64) | (0b10 << 62) | rand
    return uuid.UUID(int=value)


@dataclass(frozen=True)
class Context:
    """Who is acting and why: copied onto every event a command produces."""

    actor: common_pb2.Actor
    correlation_id: str = ""
    causation_id: str = ""
    policy_version: str = ""
    # The W3C trace context to record; None: the current span's. A command decided away from
    # its caller's task (a claim in a batch) carries the one its caller was in.
    trace_context: Mapping[str, str] | None = field(default=None, compare=False)


def service_actor(service: str) -> common_pb2.Actor:
    return common_pb2.Actor(kind=common_pb2.Actor.KIND_SERVICE, id=service)


def event_type(message: Message) -> str:
    return message.DESCRIPTOR.full_name


def current_trace_context() -> dict[str, str]:
    """The W3C trace context of the current span, to carry inside the event."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def new_envelope(
    service: str, stream_id: str, payload: Message, ctx: Context, *, version: int = 0
) -> Envelope:
    """Wrap one event; the store sets ``stream_version`` when it appends."""
    occurred = Timestamp()
    occurred.GetCurrentTime()
    return Envelope(
        event_id=event_id_for(service),
        stream_id=stream_id,
        stream_version=version,
        event_type=event_type(payload),
        payload=payload.SerializeToString(deterministic=True),
        occurred_at=occurred,
        actor=ctx.actor,
        correlation_id=ctx.correlation_id,
        causation_id=ctx.causation_id,
        trace_context=current_trace_context() if ctx.trace_context is None else ctx.trace_context,
        policy_version=ctx.policy_version,
        service=service,
    )


def payload_of(envelope: Envelope) -> Message:
    """Decode an envelope's payload into its protobuf message type."""
    cls = symbol_database.Default().GetSymbol(envelope.event_type)
    message: Message = cls()
    message.ParseFromString(envelope.payload)
    return message
