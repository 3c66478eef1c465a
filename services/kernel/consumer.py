"""Durable JetStream consumers whose handlers run inside the store's transaction.

Consumers are durable pull consumers with explicit ack. The handler's effects and the record that
the event was handled commit in one transaction, so a redelivery changes nothing. A message that
keeps failing goes to the dead-letter stream after ``max_deliver`` tries, with an alert; one that
is not an envelope, or not its owner's event (services.kernel.consumer.refusal), goes there on its
first delivery. A failure that is an outage of a part (the database down, NATS gone, Vault not
answering: services.kernel.faults.transient_part) is never the message's fault: the message is
naked with a capped back-off and retried for as long as the outage lasts, and those deliveries
do not count towards ``max_deliver``. No message and no NATS error ends a consumer: the server's
own ``max_deliver`` is unlimited, so a consumer that died on a poison message would die on it
again after every restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.invariants import InvariantViolation

from . import faults, metrics
from .background import every, pause
from .bus import EVENTS_STREAM, OutboxRelay
from .events import Envelope, belongs_to, check_actor
from .eventstore import EventStore, Tx
from .telemetry import extract, tracer

log = logging.getLogger(__name__)


Handler = Callable[[Tx, Envelope], Awaitable[None]]
# Handles a fetched batch's new events at once, in fetch order, in the batch's transaction.
BatchHandler = Callable[[Tx, list[Envelope]], Awaitable[None]]

UNDECODABLE = "DecodeError"
_OUTAGE_LOG_EVERY_S = 10.0
_MAX_TRACKED = 10_000  # messages whose outage deliveries are remembered (a few hundred KiB)


def decode(data: bytes) -> Envelope | None:
    """The envelope in a message, or None if it is not one (garbage, or no event id)."""
    try:
        env = Envelope.FromString(data)
    except Exception:
        return None
    # Empty bytes parse as an empty envelope: without an event id it cannot be marked handled.
    return env if env.event_id else None


# Why a consumer refuses a decodable message: it is not its owner's event.
WRONG_PUBLISHER = "WrongPublisher"  # the envelope names another service than the subject
WRONG_SUBJECT = "WrongSubject"  # the envelope's type is not the subject's
FOREIGN_ID = "ForeignEventId"  # the event id is not of the owning store's id scheme
PERSON_ACTOR = "MachineEventByPerson"  # a platform's or service's event with a person as actor


def refusal(subject: str, env: Envelope) -> str | None:
    """Why an event arriving on ``subject`` is not its owner's, or None if it is: the subject
    ``events.<service>.<Type>`` must name the envelope's service and type, and the event id
    must be one that service's store mints (services.kernel.events.belongs_to), and an event
    only platforms and services cause must not name a person as its actor (the check the
    owner's store makes at every append, services.kernel.events.check_actor). NATS lets only a
    service's own credential publish on its subjects; this check also catches an event
    republished elsewhere, a misrouted one, or one its owner's store would have refused."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "events" or parts[1] != env.service:
        return WRONG_PUBLISHER
    if parts[2] != env.event_type.rsplit(".", 1)[-1]:
        return WRONG_SUBJECT
    if not belongs_to(env.event_id, env.service):
        return FOREIGN_ID
    try:
        check_actor(env)
    except InvariantViolation:
        return PERSON_ACTOR
    return None


def filters(config: ConsumerConfig) -> set[str]:
    """The subjects a durable consumer's configuration filters on (one, or several)."""
    subjects = set(config.filter_subjects or ())
    if config.filter_subject:
        subjects.add(config.filter_subject)
    return subjects


# How often the lag gauges are refreshed: the alert rules' windows are minutes.
LAG_REFRESH_S = 10.0


@dataclass
class EventConsumer:
    """A durable pull consumer whose handler runs inside the store's transaction.

    Nothing a message or NATS does ends :meth:`run`: a message that is not an envelope is
    dead-lettered at once, a failed ack, nak or dead-letter publish is logged and the message
    comes back after ``ack_wait_s``, and a batch that fails anyway is logged with an alert and
    retried after a back-off.
    """

    name: str
    subjects: Sequence[str]
    handler: Handler
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    handled: int = 0
    dead_lettered: int = 0
    _backoff: Sequence[float] = field(default=(0.2, 0.5, 1.0, 2.0))
    _failure_backoff: Sequence[float] = field(default=(0.5, 1.0, 2.0, 5.0, 10.0))
    # While a part is down: short enough that the consumer notices within seconds that it is
    # back, long enough not to hammer it.
    _outage_backoff: Sequence[float] = field(default=(0.5, 1.0, 2.0, 3.0))
    # Called with the part's name when a message met an outage (the health watch probes then).
    on_outage: Callable[[str], None] | None = None
    outages: int = 0
    # Deliveries of a message that met an outage, by event id: not the message's failures.
    outage_deliveries: dict[str, int] = field(default_factory=dict)
    _outage_logged_at: float = -_OUTAGE_LOG_EVERY_S
    # After a batch smaller than a full fetch, wait this long before the next one, so that
    # events arriving one by one (a checkout's) are handled several to a transaction, a fetch
    # and a round of spans instead of one each: the checkout's profile showed audit's and
    # catalog's consumers spending most of their CPU on that per-batch work. It delays an
    # event's handling by this much at most; a backlog (full batches) is never held back.
    linger_s: float = 0.05
    fetch_batch: int = 64
    # Optional: does for a batch's new events at once what ``handler`` does for each (audit's
    # log appends a batch in one statement). ``handler`` still handles an event alone: a
    # one-message fetch, a batch's retry one by one after a failure, a dead letter's replay.
    batch_handler: BatchHandler | None = None

    def config(self) -> ConsumerConfig:
        """The durable's configuration: what :meth:`subscribe` creates, or updates to."""
        # One literal subject goes as filter_subject, which the create request carries in its
        # NATS subject, so a service's permissions can bind its consumers to the producers it
        # consumes (services/kernel/natsauth.py: BOUND_CONSUMERS_ONLY). A wildcard filter
        # (audit's events.>) cannot be matched by a permission, so it goes in the request body.
        one = len(self.subjects) == 1 and not {"*", ">"} & set(self.subjects[0].split("."))
        return ConsumerConfig(
            durable_name=self.name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,  # we count deliveries ourselves and dead-letter, never drop
            filter_subject=self.subjects[0] if one else None,
            filter_subjects=None if one else list(self.subjects),
        )

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """Bind to the durable, creating it if it does not exist, or first updating its filter
        in place if it filters on other subjects than this consumer's (a release that narrowed
        or widened them): JetStream keeps the durable's position and pending acks through a
        filter update, so no event is delivered anew from the start and none already acked is
        lost; one still pending redelivers, and the handled marks make that change nothing.
        A widened filter takes the new subjects from the durable's position on, not their
        history (a subject newly consumed needs a replay: services/kernel/deadletters.py)."""
        config = self.config()
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(EVENTS_STREAM, self.name)
            if filters(info.config) != set(self.subjects):
                log.warning(
                    "consumer %s filtered on %s: updating it to %s in place",
                    self.name,
                    sorted(filters(info.config)),
                    sorted(self.subjects),
                    extra={"consumer": self.name},
                )
                await js.add_consumer(EVENTS_STREAM, config=config)
        # Binds to the durable consumer when it exists, creates it otherwise (nats-py sets
        # filter_subject from the subject it is given unless filter_subjects is set).
        subject = config.filter_subject or ""
        return await js.pull_subscribe(
            subject, durable=self.name, stream=EVENTS_STREAM, config=config
        )

    async def refresh_lag(self, js: JetStreamContext) -> tuple[int, int]:
        """Set this consumer's lag gauges from JetStream's consumer info (a background refresh,
        not the fetch loop); returns (pending, ack pending)."""
        info = await js.consumer_info(EVENTS_STREAM, self.name)
        pending, ack_pending = int(info.num_pending or 0), int(info.num_ack_pending or 0)
        metrics.CONSUMER_PENDING.labels(self.name).set(pending)
        metrics.CONSUMER_ACK_PENDING.labels(self.name).set(ack_pending)
        return pending, ack_pending

    async def handle(self, store: EventStore, js: JetStreamContext, msg: Msg) -> None:
        env = await self._admit(js, msg)
        if env is not None:
            await self._handle(store, js, msg, env)

    async def _admit(self, js: JetStreamContext, msg: Msg) -> Envelope | None:
        """The message's envelope if it is its owner's event; otherwise it is dead-lettered at
        once (with why) and None: nothing is handled, nothing changes."""
        env = decode(msg.data)
        if env is None:
            await self._dead_letter_undecodable(js, msg)
            return None
        why = refusal(msg.subject, env)
        if why is None:
            return env
        metrics.EVENTS_REFUSED.labels(self.name, why).inc()
        seq = msg.metadata.sequence.stream
        headers = {
            "Nats-Msg-Id": f"{self.name}:refused:{seq}",
            "Subsidy-Consumer": self.name,
            "Subsidy-Original-Subject": msg.subject,
            "Subsidy-Original-Sequence": str(seq),
            "Subsidy-Error": why,
        }
        if await self._publish_dead_letter(js, msg, headers, f"stream-seq:{seq}"):
            log.error(
                "refused an event that is not its owner's (%s); moved to the dead-letter stream",
                why,
                extra={"subject": msg.subject, "alert": "forged-event", "consumer": self.name},
            )
        return None

    def _span(self, msg: Msg, env: Envelope) -> AbstractContextManager[trace.Span]:
        """The consumer span, a child of the publisher's (trace context in the NATS headers)."""
        return tracer().start_as_current_span(
            f"{self.name} consume {env.event_type.rsplit('.', 1)[-1]}",
            context=extract(msg.headers or {}),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "messaging.message.id": env.event_id},
        )

    async def _apply(self, tx: Tx, env: Envelope) -> int:
        """Mark the event handled and run the handler, in ``tx``; 1 if it was new, else 0."""
        if not await tx.mark_handled(self.name, env.event_id):
            return 0
        await self.handler(tx, env)
        return 1

    async def apply(self, tx: Tx, env: Envelope) -> int:
        """:meth:`_apply` for a dead letter's replay (services.kernel.deadletters): the same
        handled-events record, so an event is handled once however it arrives."""
        return await self._apply(tx, env)

    def count_handled(self, handled: int) -> None:
        """Count events handled outside the fetch loop (a replay)."""
        self._count(handled)

    def _count(self, handled: int) -> None:
        self.handled += handled
        metrics.EVENTS_HANDLED.labels(self.name).inc(handled)

    def _done_with(self, event_id: str) -> None:
        self.outage_deliveries.pop(event_id, None)

    async def _outage(self, msg: Msg, env: Envelope, part: str) -> None:
        """The handler met ``part`` down: nak with a capped back-off; this delivery does not
        count towards the dead-letter limit. A quiet log line every few seconds at most, no
        traceback: the health watch reports the outage itself."""
        counted = self.outage_deliveries
        if env.event_id not in counted and len(counted) >= _MAX_TRACKED:
            counted.pop(next(iter(counted)))  # bounded; the oldest entry was probably settled
        counted[env.event_id] = counted.get(env.event_id, 0) + 1
        self.outages += 1
        metrics.CONSUMER_OUTAGES.labels(self.name, part).inc()
        if self.on_outage is not None:
            self.on_outage(part)
        tries = counted[env.event_id]
        delay = self._outage_backoff[min(tries, len(self._outage_backoff)) - 1]
        now = time.monotonic()
        if now - self._outage_logged_at >= _OUTAGE_LOG_EVERY_S:
            self._outage_logged_at = now
            log.warning(
                "%s: the %s is down; %d events wait, retried every %.1f s at most (an outage is"
                " not an event's failure)",
                self.name,
                part,
                len(counted),
                self._outage_backoff[-1],
                extra={"consumer": self.name, "part": part},
            )
        await self._settle(msg.nak(delay=delay), "nak", env.event_id)

    async def _handle(
        self, store: EventStore, js: JetStreamContext, msg: Msg, env: Envelope
    ) -> None:
        with self._span(msg, env) as span:
            try:
                async with store.transaction() as tx:
                    handled = await self._apply(tx, env)
                self._count(handled)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR))
                part = faults.transient_part(exc)
                if part is not None:
                    await self._outage(msg, env, part)
                else:
                    await self._failed(js, msg, env, exc)
                return
        self._done_with(env.event_id)
        # Outside the try: a lost ack is not a handler failure (the handled mark committed, so
        # the redelivery changes nothing) and must never dead-letter a handled event.
        await self._settle(msg.ack(), "ack", env.event_id)

    async def _failed(self, js: JetStreamContext, msg: Msg, env: Envelope, exc: Exception) -> None:
        # Deliveries that met an outage were not this message's failures.
        delivered = msg.metadata.num_delivered - self.outage_deliveries.get(env.event_id, 0)
        if delivered >= self.max_deliver:
            self._done_with(env.event_id)
            await self._dead_letter(js, msg, env, exc)
            return
        log.warning(
            "handler failed (delivery %d of %d); will retry",
            delivered,
            self.max_deliver,
            extra={"event_id": env.event_id, "event_type": env.event_type},
        )
        delay = self._backoff[min(delivered, len(self._backoff)) - 1]
        await self._settle(msg.nak(delay=delay), "nak", env.event_id)

    async def handle_batch(self, store: EventStore, js: JetStreamContext, msgs: list[Msg]) -> None:
        """Handle a fetched batch in one transaction, its handled marks in one statement; if any
        handler fails, none of the batch commits (marks included) and each message is handled
        on its own, so only the failing one is retried.
        A message that is not an envelope, or not its owner's event, is dead-lettered at once
        and takes no part."""
        batch: list[tuple[Msg, Envelope]] = []
        for msg in msgs:
            env = await self._admit(js, msg)
            if env is not None:
                batch.append((msg, env))
        if len(batch) == 1:
            await self._handle(store, js, *batch[0])
            return
        if not batch:
            return
        handled = 0
        try:
            async with store.transaction() as tx:
                # The batch's handled marks in one statement, not one per event: the events
                # this consumer had not handled before (an id given twice counts once).
                new = await tx.mark_handled_many(self.name, [env.event_id for _, env in batch])
                if self.batch_handler is not None:
                    fresh: list[Envelope] = []
                    with contextlib.ExitStack() as spans:
                        for msg, env in batch:
                            spans.enter_context(self._span(msg, env))
                            if env.event_id in new:
                                new.discard(env.event_id)
                                fresh.append(env)
                        if fresh:
                            await self.batch_handler(tx, fresh)
                    handled = len(fresh)
                else:
                    for msg, env in batch:
                        with self._span(msg, env):
                            if env.event_id in new:
                                new.discard(env.event_id)
                                await self.handler(tx, env)
                                handled += 1
        except Exception as exc:
            part = faults.transient_part(exc)
            if part is not None:
                # The part is down for every message alike: trying each alone would only
                # meet it again, once per message.
                for msg, env in batch:
                    await self._outage(msg, env, part)
                return
            for msg, env in batch:
                await self._handle(store, js, msg, env)
            return
        self._count(handled)
        for msg, env in batch:
            self._done_with(env.event_id)
            await self._settle(msg.ack(), "ack", env.event_id)

    async def _settle(self, reply: Awaitable[None], what: str, event_id: str) -> bool:
        """Send an ack, nak or term; a failure is logged: JetStream redelivers the message
        after ``ack_wait_s`` and the handled mark makes that redelivery change nothing."""
        try:
            await reply
        except Exception:
            log.warning(
                "%s failed; the message will be redelivered",
                what,
                exc_info=True,
                extra={"event_id": event_id, "consumer": self.name},
            )
            return False
        return True

    async def _dead_letter(
        self, js: JetStreamContext, msg: Msg, env: Envelope, exc: Exception
    ) -> None:
        headers = {
            "Nats-Msg-Id": f"{self.name}:{env.event_id}",
            "Subsidy-Consumer": self.name,
            "Subsidy-Original-Subject": msg.subject,
            "Subsidy-Error": type(exc).__name__,
        }
        if not await self._publish_dead_letter(js, msg, headers, env.event_id):
            return
        log.error(
            "poison message moved to the dead-letter stream after %d deliveries",
            self.max_deliver,
            extra={"event_id": env.event_id, "event_type": env.event_type, "alert": "dead-letter"},
        )

    async def _dead_letter_undecodable(self, js: JetStreamContext, msg: Msg) -> None:
        """A message that is not an envelope can never be handled: dead-letter it on its first
        delivery. Its bytes go to the dead-letter stream as they are, never into headers or
        logs (they may hold anything)."""
        seq = msg.metadata.sequence.stream
        headers = {
            "Nats-Msg-Id": f"{self.name}:undecodable:{seq}",
            "Subsidy-Consumer": self.name,
            "Subsidy-Original-Subject": msg.subject,
            "Subsidy-Original-Sequence": str(seq),
            "Subsidy-Error": UNDECODABLE,
        }
        if not await self._publish_dead_letter(js, msg, headers, f"stream-seq:{seq}"):
            return
        log.error(
            "undecodable message (%d bytes, stream sequence %d) moved to the dead-letter stream",
            len(msg.data),
            seq,
            extra={"subject": msg.subject, "alert": "dead-letter"},
        )

    async def _publish_dead_letter(
        self, js: JetStreamContext, msg: Msg, headers: dict[str, str], ref: str
    ) -> bool:
        try:
            await js.publish(f"dlq.{self.name}", msg.data, headers=headers)
        except Exception:
            # Not lost: without a term the message comes back and is dead-lettered again
            # (the Nats-Msg-Id makes a second copy in the dead-letter stream a duplicate).
            log.exception(
                "could not publish to the dead-letter stream; the message will be redelivered",
                extra={"event_id": ref, "consumer": self.name, "alert": "dead-letter"},
            )
            return False
        self.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(self.name).inc()
        await self._settle(msg.term(), "term", ref)
        return True

    async def run(self, store: EventStore, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Consume until ``stop``. Only a failure to subscribe ends it early (the service then
        reports NOT_SERVING); after that, every failure is logged and retried."""
        sub = await self.subscribe(js)
        failures = 0
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=self.fetch_batch, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                if stop.is_set():
                    break
                part = faults.transient_part(exc)
                if part is None:
                    log.exception("fetch failed; retrying", extra={"alert": "consumer"})
                else:  # NATS is reconnecting: the health watch reports it
                    log.warning("fetch failed: the %s is down; retrying", part)
                    if self.on_outage is not None:
                        self.on_outage(part)
                await pause(stop, 1.0)
                continue
            try:
                await self.handle_batch(store, js, msgs)
            except Exception:
                failures += 1
                delay = self._failure_backoff[min(failures, len(self._failure_backoff)) - 1]
                log.exception(
                    "consumer %s failed on a batch of %d; retrying in %.1f s",
                    self.name,
                    len(msgs),
                    delay,
                    extra={"alert": "consumer"},
                )
                await pause(stop, delay)
            else:
                failures = 0
                if len(msgs) < self.fetch_batch and self.linger_s > 0:
                    await asyncio.sleep(self.linger_s)  # stop is checked at the loop
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def keep_lag_metrics(
    stop: asyncio.Event,
    relay: OutboxRelay,
    consumers: Sequence[EventConsumer],
    js: JetStreamContext,
    every_s: float = LAG_REFRESH_S,
) -> None:
    """Refresh the relay's and the consumers' lag gauges every ``every_s`` until ``stop``.

    Beside the relay and the consumers, never inside them: their loops stay as they are, and a
    refresh that fails (a part is down) is retried next round (services.kernel.background)."""

    async def refresh() -> None:
        await relay.refresh_lag()
        for consumer in consumers:
            await consumer.refresh_lag(js)
        metrics.LAG_REFRESHED.set(time.time())

    await every(
        stop, every_s, refresh, log=log, failure="lag metrics refresh failed", alert="metrics"
    )
