"""Dead letters of a service's durable consumers: listed, shown and replayed by operators.

A consumer moves an event to the dead-letter stream (``dlq.<consumer>``) when it fails for a
reason of its own (services/kernel/consumer.py). Once an operator has fixed the cause (a
handler's bug, a missing policy), :meth:`DeadLetters.replay` hands the event to the consumer
again, in one transaction with the record that it handled it and a ``DeadLetterReplayed`` event
naming the operator and the reason. The consumer's handled-events record (``handled_events``)
makes a replay idempotent: an event it has handled is never handled again, so replaying twice,
or replaying what a redelivery already handled, changes nothing.

The service reads its own consumers' letters from the stream itself (one ``STREAM.MSG.GET`` per
letter), so the CLI needs no NATS credentials and the letters' bytes never leave the cluster: an
answer carries the envelope's metadata, never its payload.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from sqlalchemy import text

from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import outbox_pb2

from . import faults
from .bus import DLQ_STREAM
from .consumer import EventConsumer, refusal
from .errors import InvalidArgument, NotFound
from .events import Context, Envelope, new_envelope
from .eventstore import EventStore

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# JetStream's sequences are signed 64-bit on the wire: a larger one is the request's fault.
MAX_SEQUENCE = 2**63 - 1
HANDLED = "handled"
ALREADY_HANDLED = "already_handled"
STILL_FAILING = "still_failing"
NOT_REPLAYABLE = "not_replayable"


@dataclass(frozen=True)
class Letter:
    """One message of the dead-letter stream, as its consumer's headers describe it."""

    sequence: int
    consumer: str
    reason: str
    original_subject: str
    at: datetime | None
    envelope: Envelope | None  # None: the message is not an envelope


def _letter(raw: RawStreamMsg) -> Letter:
    headers = raw.headers or {}
    try:
        env: Envelope | None = Envelope.FromString(raw.data or b"")
    except DecodeError:
        env = None
    if env is not None and not env.event_id:
        env = None
    return Letter(
        sequence=int(raw.seq or 0),
        consumer=headers.get("Subsidy-Consumer", ""),
        reason=headers.get("Subsidy-Error", ""),
        original_subject=headers.get("Subsidy-Original-Subject", ""),
        at=raw.time,
        envelope=env,
    )


def replay_stream(consumer: str, event_id: str) -> str:
    """The stream of a replay's ``DeadLetterReplayed`` event: one per consumer and event."""
    return f"dead-letter-replays/{consumer}/{event_id}"


class DeadLetters:
    """The dead letters of one service's consumers."""

    def __init__(
        self,
        store: EventStore,
        js: JetStreamContext,
        service: str,
        consumers: Sequence[EventConsumer],
    ) -> None:
        self._store = store
        self._js = js
        self._service = service
        self._consumers = {c.name: c for c in consumers}

    def _consumer(self, name: str) -> EventConsumer:
        if name not in self._consumers:
            raise InvalidArgument(
                "UNKNOWN_CONSUMER",
                "consumer: not one of this service's consumers"
                f" ({', '.join(sorted(self._consumers)) or 'it has none'})",
                field="consumer",
            )
        return self._consumers[name]

    async def _raw(self, seq: int, subject: str | None = None) -> RawStreamMsg | None:
        if seq > MAX_SEQUENCE:
            raise InvalidArgument(
                "INVALID_SEQUENCE", "sequence: a dead letter's sequence", field="sequence"
            )
        try:
            if subject is None:
                return await self._js.get_msg(DLQ_STREAM, seq=seq)
            return await self._js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return None

    async def list(self, consumer: str = "", after: int = 0, limit: int = 0) -> list[Letter]:
        """This service's letters after sequence ``after`` (of one consumer, or all), oldest
        first, at most ``limit`` (0: :data:`DEFAULT_LIMIT`)."""
        if consumer:
            self._consumer(consumer)
        if not 0 <= limit <= MAX_LIMIT:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 0 to {MAX_LIMIT}", field="limit")
        subject = f"dlq.{consumer}" if consumer else "dlq.>"
        letters: list[Letter] = []
        seq = after
        while len(letters) < (limit or DEFAULT_LIMIT):
            raw = await self._raw(seq + 1, subject)
            if raw is None or not raw.seq:
                break
            seq = int(raw.seq)
            letter = _letter(raw)
            if letter.consumer in self._consumers:  # the stream holds every service's
                letters.append(letter)
        return letters

    async def get(self, sequence: int) -> Letter:
        """One of this service's letters; NOT_FOUND for another service's or none."""
        raw = await self._raw(sequence) if sequence > 0 else None
        letter = _letter(raw) if raw is not None else None
        if letter is None or letter.consumer not in self._consumers:
            raise NotFound(
                "DEAD_LETTER_NOT_FOUND",
                "sequence: no dead letter of this service's consumers",
                field="sequence",
            )
        return letter

    async def handled(self, letter: Letter) -> bool:
        """Whether the letter's consumer has handled its event (since, by a replay)."""
        if letter.envelope is None:
            return False
        async with self._store.engine.connect() as conn:
            row = await conn.execute(
                text("SELECT 1 FROM handled_events WHERE consumer = :c AND event_id = :e"),
                {"c": letter.consumer, "e": letter.envelope.event_id},
            )
            return row.first() is not None

    async def replay(self, letter: Letter, ctx: Context) -> outbox_pb2.ReplayOutcome:
        """Hand one letter to its consumer again; what came of it (never raises for the
        event's own failure; a part that is down raises, and the call answers UNAVAILABLE)."""
        consumer = self._consumer(letter.consumer)
        env = letter.envelope
        outcome = outbox_pb2.ReplayOutcome(sequence=letter.sequence, consumer=letter.consumer)
        if env is None:
            outcome.outcome, outcome.error = NOT_REPLAYABLE, "not an event envelope"
            return outcome
        outcome.event_id = env.event_id
        why = refusal(letter.original_subject, env)
        if why is not None:  # a forged or misrouted event stays refused
            outcome.outcome, outcome.error = NOT_REPLAYABLE, why
            return outcome
        record = new_envelope(
            self._service,
            replay_stream(consumer.name, env.event_id),
            ev.DeadLetterReplayed(
                event_id=env.event_id,
                consumer=consumer.name,
                dead_letter_sequence=letter.sequence,
                reason=ctx.actor.reason,
            ),
            ctx,
        )
        try:
            async with self._store.transaction() as tx:
                if not await consumer.apply(tx, env):
                    outcome.outcome = ALREADY_HANDLED
                    return outcome
                await tx.append(record.stream_id, 0, [record])
        except Exception as exc:
            if faults.transient_part(exc) is not None:
                raise
            log.warning(
                "dead letter %d (%s) still fails: %s",
                letter.sequence,
                consumer.name,
                type(exc).__name__,
                extra={"event_id": env.event_id, "consumer": consumer.name},
            )
            outcome.outcome, outcome.error = STILL_FAILING, type(exc).__name__
            return outcome
        consumer.count_handled(1)
        log.info(
            "dead letter %d replayed: %s handled event %s",
            letter.sequence,
            consumer.name,
            env.event_id,
            extra={"event_id": env.event_id, "consumer": consumer.name},
        )
        outcome.outcome = HANDLED
        return outcome

    async def describe(self, letter: Letter) -> outbox_pb2.DeadLetter:
        """The letter as the API shows it: the envelope's metadata, never its payload."""
        out = outbox_pb2.DeadLetter(
            sequence=letter.sequence,
            consumer=letter.consumer,
            reason=letter.reason,
            original_subject=letter.original_subject,
        )
        if letter.at is not None:
            stamp = Timestamp()
            stamp.FromDatetime(letter.at)
            out.dead_lettered_at.CopyFrom(stamp)
        env = letter.envelope
        if env is not None:
            out.event_id, out.event_type = env.event_id, env.event_type
            out.stream_id, out.stream_version = env.stream_id, env.stream_version
            out.producer = env.service
            out.occurred_at.CopyFrom(env.occurred_at)
            out.correlation_id, out.causation_id = env.correlation_id, env.causation_id
            out.handled = await self.handled(letter)
        return out
