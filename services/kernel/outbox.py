"""The outbox relay's operator interface, served by every service (subsidy.v1.OutboxService).

An event the bus refuses (over its payload limit, or not allowed) would hold back every later
event of the service. The store refuses such events at append (services.kernel.events.
check_size), so this should never happen; if it does, the relay stops at that event, health turns
NOT_SERVING, a metric and an alert name it, and the relay moves on only when an operator skips
that one event, which is itself recorded as an event (who, when, why).
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.js import JetStreamContext

from services.kernel import validate
from services.kernel.consumer import EventConsumer
from services.kernel.deadletters import MAX_LIMIT, DeadLetters
from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, Projector
from services.kernel.identity import caller
from services.kernel.pipeline import Aggregate, Pipeline
from services.kernel.rpc import Registration, ServicerContext
from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import outbox_pb2, outbox_pb2_grpc

from .bus import SKIPS_STREAM, OutboxRelay


async def _nothing(conn: object, key: str) -> None:
    return None


async def _no_read_model(conn: object, env: object) -> None:
    return None  # skips are read back from their own stream (OutboxRelay.skipped)


SKIPS: Aggregate[str, None] = Aggregate("outbox-skips", lambda _: SKIPS_STREAM, _nothing)


def skip(stuck: tuple[str, str] | None, event_id: str, reason: str) -> list[ev.OutboxEventSkipped]:
    """Only the event the relay is stuck on can be skipped, and only with a reason."""
    if stuck is None or stuck[0] != event_id:
        raise FailedPrecondition(
            "NOT_THE_STUCK_EVENT",
            "event_id: the relay is not stuck on this event"
            + (f" (it is stuck on {stuck[0]})" if stuck else " (it is not stuck)"),
            field="event_id",
        )
    return [ev.OutboxEventSkipped(event_id=event_id, reason=reason)]


class OutboxApi(outbox_pb2_grpc.OutboxServiceServicer):
    def __init__(
        self,
        store: EventStore,
        service: str,
        relay: OutboxRelay,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.relay = relay
        self.dead_letters = dead_letters or DeadLetters(store, relay.js, service, ())
        project: Projector = _no_read_model
        self.pipeline = Pipeline(store, service, project)

    async def _status(self) -> outbox_pb2.OutboxStatus:
        stuck = self.relay.stuck
        return outbox_pb2.OutboxStatus(
            stuck_event_id=stuck[0] if stuck else "",
            stuck_reason=stuck[1] if stuck else "",
            published=self.relay.published,
            skipped_event_ids=sorted(await self.relay.skipped()),
        )

    async def GetOutboxStatus(
        self, request: outbox_pb2.GetOutboxStatusRequest, context: ServicerContext
    ) -> outbox_pb2.OutboxStatus:
        return await self._status()

    async def SkipStuckEvent(
        self, request: outbox_pb2.SkipStuckEventRequest, context: ServicerContext
    ) -> outbox_pb2.OutboxStatus:
        event_id = validate.identifier("event_id", request.event_id)
        reason = validate.text_field("reason", request.reason, max_len=500)
        stuck = self.relay.stuck
        await self.pipeline.run(
            SKIPS, SKIPS_STREAM, lambda _: skip(stuck, event_id, reason),
            Context(caller().actor(reason), correlation_id=event_id),
        )  # fmt: skip
        await self.relay.publish_pending_soon()
        return await self._status()

    async def ListDeadLetters(
        self, request: outbox_pb2.ListDeadLettersRequest, context: ServicerContext
    ) -> outbox_pb2.ListDeadLettersResponse:
        consumer = validate.identifier("consumer", request.consumer) if request.consumer else ""
        letters = await self.dead_letters.list(consumer, request.after_sequence, request.limit)
        return outbox_pb2.ListDeadLettersResponse(
            dead_letters=[await self.dead_letters.describe(letter) for letter in letters]
        )

    async def GetDeadLetter(
        self, request: outbox_pb2.GetDeadLetterRequest, context: ServicerContext
    ) -> outbox_pb2.DeadLetter:
        return await self.dead_letters.describe(await self.dead_letters.get(request.sequence))

    async def ReplayDeadLetters(
        self, request: outbox_pb2.ReplayDeadLettersRequest, context: ServicerContext
    ) -> outbox_pb2.ReplayDeadLettersResponse:
        reason = validate.text_field("reason", request.reason, max_len=500)
        consumer = validate.identifier("consumer", request.consumer) if request.consumer else ""
        if request.all == (request.sequence != 0):
            raise InvalidArgument(
                "ONE_OR_ALL",
                "sequence: one dead letter's sequence, or all = true (not both)",
                field="sequence",
            )
        if request.all:
            letters, after = [], 0
            while page := await self.dead_letters.list(consumer, after, MAX_LIMIT):
                letters += page
                after = page[-1].sequence
        else:
            letters = [await self.dead_letters.get(request.sequence)]
        ctx = Context(caller().actor(reason))
        outcomes = []
        seen: set[tuple[str, str]] = set()
        for letter in letters:
            key = (letter.consumer, letter.envelope.event_id if letter.envelope else "")
            if key in seen and key[1]:
                continue  # the same event dead-lettered twice (redelivered): one replay
            seen.add(key)
            outcomes.append(await self.dead_letters.replay(letter, ctx))
        return outbox_pb2.ReplayDeadLettersResponse(outcomes=outcomes)


def registration(
    store: EventStore,
    service: str,
    relay: OutboxRelay,
    consumers: Sequence[EventConsumer] = (),
    js: JetStreamContext | None = None,
) -> Registration:
    """The OutboxService registration every service's server gets (services.kernel.app)."""
    letters = DeadLetters(store, js or relay.js, service, consumers)
    return (
        outbox_pb2_grpc.add_OutboxServiceServicer_to_server,
        OutboxApi(store, service, relay, letters),
    )
