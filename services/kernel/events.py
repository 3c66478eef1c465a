"""Event envelopes: building them, naming their types, and reading their payloads."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

from google.protobuf import symbol_database
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate

from subsidy.v1 import common_pb2, events_pb2

Actor = common_pb2.Actor
Envelope = events_pb2.EventEnvelope

_last_ms = 0
_seq = 0


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort roughly by creation."""
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
    value = (ms << 80) | (0x7 << 76) | (_seq << 64) | (0b10 << 62) | rand
    return uuid.UUID(int=value)


@dataclass(frozen=True)
class Context:
    """Who is acting and why: copied onto every event a command produces."""

    actor: common_pb2.Actor
    correlation_id: str = ""
    causation_id: str = ""
    policy_version: str = ""


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
        event_id=str(uuid7()),
        stream_id=stream_id,
        stream_version=version,
        event_type=event_type(payload),
        payload=payload.SerializeToString(deterministic=True),
        occurred_at=occurred,
        actor=ctx.actor,
        correlation_id=ctx.correlation_id,
        causation_id=ctx.causation_id,
        trace_context=current_trace_context(),
        policy_version=ctx.policy_version,
        service=service,
    )


def payload_of(envelope: Envelope) -> Message:
    """Decode an envelope's payload into its protobuf message type."""
    cls = symbol_database.Default().GetSymbol(envelope.event_type)
    message: Message = cls()
    message.ParseFromString(envelope.payload)
    return message
