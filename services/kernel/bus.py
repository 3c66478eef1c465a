"""NATS JetStream: the streams, the outbox relay and durable consumers.

- Every service's relay publishes its store's events to ``events.<service>.<EventType>`` with
  ``Nats-Msg-Id`` = event id, so a re-publish after a crash is dropped by JetStream's duplicate
  window, and checkpoints only after the acks.
- Consumers are durable pull consumers with explicit ack. The handler's effects and the record
  that the event was handled commit in one transaction, so a redelivery changes nothing. A message
  that keeps failing goes to the dead-letter stream after ``max_deliver`` tries, with an alert;
  one that is not an envelope at all goes there on its first delivery. No message and no NATS
  error ends a consumer: the server's own ``max_deliver`` is unlimited, so a consumer that died
  on a poison message would die on it again after every restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from subsidy.v1 import events_pb2 as ev

from . import metrics
from .background import pause
from .events import Envelope, belongs_to
from .eventstore import EventStore, Position, Tx
from .natsauth import Credentials
from .settings import RelaySettings
from .telemetry import extract, inject, tracer

log = logging.getLogger(__name__)

EVENTS_STREAM = "SUBSIDY_EVENTS"
DLQ_STREAM = "SUBSIDY_DLQ"
DUPLICATE_WINDOW_S = 600.0


def subject_for(envelope: Envelope) -> str:
    return f"events.{envelope.service}.{envelope.event_type.rsplit('.', 1)[-1]}"


async def connect(
    url: str, name: str, credentials: Credentials
) -> tuple[NatsClient, JetStreamContext]:
    """Connect over TLS (the server's certificate verified against ``credentials.ca_pem``)
    as ``credentials.user``, signing the server's nonce with its nkey seed."""
    nc = await nats.connect(
        url,
        name=name,
        tls=credentials.ssl_context(),
        nkeys_seed_str=credentials.seed or None,
        # Replies come back on the user's own inbox prefix, the only one it may subscribe to.
        inbox_prefix=credentials.inbox_prefix,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
    )
    return nc, nc.jetstream(timeout=10)


class StreamsNotReady(RuntimeError):
    """A stream is missing or differs from what the platform needs, and this credential may
    not create or change streams (only the operator's may)."""


def _differs(have: StreamConfig, want: StreamConfig) -> bool:
    """True if ``have`` lacks something ``want`` asks for (an unset field: the server's
    default, e.g. the dead-letter stream's duplicate window)."""
    return any(
        getattr(want, f) and getattr(have, f) != getattr(want, f)
        for f in ("subjects", "storage", "duplicate_window", "num_replicas")
    )


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create the events and dead-letter streams, or update one that differs; idempotent.

    Only the operator's credential may create or change a stream: with a service's, a stream
    that exists as configured passes (a read), and anything else raises StreamsNotReady."""
    for cfg in (
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["events.>"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=DLQ_STREAM, subjects=["dlq.>"], storage=StorageType.FILE, num_replicas=replicas
        ),
    ):
        try:
            try:
                info = await js.stream_info(cfg.name)  # type: ignore[arg-type]
            except NotFoundError:
                await js.add_stream(cfg)
                continue
            if _differs(info.config, cfg):
                await js.update_stream(cfg)
        except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
            # A denied API call is a permissions violation the server reports out of band;
            # the request itself only times out.
            raise StreamsNotReady(
                f"stream {cfg.name} is missing or differs and could not be set up "
                f"({type(exc).__name__}); only the operator's NATS credential may create or "
                "change it (docs/operations.md, NATS accounts)"
            ) from None


SKIPS_STREAM = "outbox/skips"
# What the bus answers for an event it will never take (as opposed to being unreachable): the
# payload is over its max_payload, or the publish is not allowed, or JetStream refuses it.
REFUSED_BY_THE_BUS: tuple[type[Exception], ...] = (
    nats.errors.MaxPayloadError,
    nats.errors.BadSubjectError,
    BadRequestError,
)


class RelayStuck(RuntimeError):
    """The relay cannot publish an event the bus refuses; it holds every later one."""


class OutboxRelay:
    """Publishes a store's events to JetStream in the global order, resuming after a crash."""

    def __init__(
        self, store: EventStore, js: JetStreamContext, *, name: str = "relay", batch: int = 256
    ) -> None:
        self._store = store
        self._js = js
        self._name = name
        self._batch = batch
        self.published = 0
        self._pos: Position | None = None  # only this relay writes its checkpoint
        # The event the bus refuses (too large, not allowed), and why: while set, nothing after
        # it is published, health is NOT_SERVING, and only an operator's skip moves on.
        self.stuck: tuple[str, str] | None = None
        self.on_stuck: Callable[[bool], Awaitable[None]] | None = None

    async def publish_pending(self) -> int:
        """Publish everything not yet published; return how many were sent."""
        if self._pos is None:
            self._pos = await self._store.load_checkpoint(self._name)
        pos = self._pos
        sent = 0
        while True:
            batch = await self._store.read_all(pos, limit=self._batch)
            if not batch:
                return sent
            for rec in batch:
                try:
                    await self._publish(rec.envelope)
                except REFUSED_BY_THE_BUS as exc:
                    if rec.envelope.event_id not in await self.skipped():
                        await self._save(pos)  # what went before it is published
                        await self._stick(rec.envelope, exc)
                        raise RelayStuck(rec.envelope.event_id) from exc
                    log.warning(
                        "not publishing event %s: an operator skipped it",
                        rec.envelope.event_id,
                        extra={"event_id": rec.envelope.event_id},
                    )
                pos = rec.position
            await self._save(pos)
            await self._unstick()
            metrics.EVENTS_PUBLISHED.inc(len(batch))
            sent += len(batch)
            self.published += len(batch)

    async def _save(self, pos: Position) -> None:
        if pos != self._pos:
            await self._store.save_checkpoint(self._name, pos)
            self._pos = pos

    async def _stick(self, env: Envelope, exc: Exception) -> None:
        first = self.stuck is None or self.stuck[0] != env.event_id
        self.stuck = (env.event_id, type(exc).__name__)
        metrics.UNPUBLISHABLE.labels(env.event_id).set(1)
        if first:
            log.error(
                "the event bus refuses event %s (%s, %d bytes); the relay holds every later event"
                " until an operator skips it (OutboxService.SkipStuckEvent)",
                env.event_id,
                type(exc).__name__,
                env.ByteSize(),
                extra={"event_id": env.event_id, "alert": "relay-stuck"},
            )
            if self.on_stuck is not None:
                await self.on_stuck(True)

    async def _unstick(self) -> None:
        if self.stuck is not None:
            metrics.UNPUBLISHABLE.labels(self.stuck[0]).set(0)
            self.stuck = None
            if self.on_stuck is not None:
                await self.on_stuck(False)

    async def publish_pending_soon(self) -> None:
        """Wake the relay's loop now (after a skip) instead of at its next retry."""
        self._store.appended.set()

    async def skipped(self) -> set[str]:
        """The events operators let the relay past (their OutboxEventSkipped events)."""
        return {
            ev.OutboxEventSkipped.FromString(e.payload).event_id
            for e in await self._store.read_stream(SKIPS_STREAM)
        }

    async def _publish(self, env: Envelope) -> None:
        with tracer().start_as_current_span(
            f"publish {env.event_type.rsplit('.', 1)[-1]}",
            context=extract(env.trace_context),
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.message.id": env.event_id},
        ):
            headers = {"Nats-Msg-Id": env.event_id, **inject()}
            await self._js.publish(
                subject_for(env), env.SerializeToString(deterministic=True), headers=headers
            )

    async def run(self, stop: asyncio.Event, idle_poll_s: float = 0.1) -> None:
        """Relay until ``stop``; wakes on an in-process append, polls for other writers."""
        while not stop.is_set():
            try:
                await self.publish_pending()
            except RelayStuck:
                await pause(stop, 1.0)  # logged once when it stuck; tried again each second
            except Exception:
                log.exception("relay failed; retrying", extra={"alert": "relay"})
                await asyncio.sleep(1.0)
            self._store.appended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store.appended.wait(), idle_poll_s)


Handler = Callable[[Tx, Envelope], Awaitable[None]]

UNDECODABLE = "DecodeError"


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


def refusal(subject: str, env: Envelope) -> str | None:
    """Why an event arriving on ``subject`` is not its owner's, or None if it is: the subject
    ``events.<service>.<Type>`` must name the envelope's service and type, and the event id
    must be one that service's store mints (services.kernel.events.belongs_to). NATS lets only
    a service's own credential publish on its subjects; this check also catches an event
    republished elsewhere or a misrouted one."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "events" or parts[1] != env.service:
        return WRONG_PUBLISHER
    if parts[2] != env.event_type.rsplit(".", 1)[-1]:
        return WRONG_SUBJECT
    if not belongs_to(env.event_id, env.service):
        return FOREIGN_ID
    return None


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

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=self.name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,  # we count deliveries ourselves and dead-letter, never drop
            filter_subjects=list(self.subjects),
        )
        # Binds to the durable consumer when it exists, creates it otherwise.
        return await js.pull_subscribe("", durable=self.name, stream=EVENTS_STREAM, config=config)

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

    def _count(self, handled: int) -> None:
        self.handled += handled
        metrics.EVENTS_HANDLED.labels(self.name).inc(handled)

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
                await self._failed(js, msg, env, exc)
                return
        # Outside the try: a lost ack is not a handler failure (the handled mark committed, so
        # the redelivery changes nothing) and must never dead-letter a handled event.
        await self._settle(msg.ack(), "ack", env.event_id)

    async def _failed(self, js: JetStreamContext, msg: Msg, env: Envelope, exc: Exception) -> None:
        delivered = msg.metadata.num_delivered
        if delivered >= self.max_deliver:
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
        """Handle a fetched batch in one transaction; if any handler fails, none of the batch
        commits and each message is handled on its own, so only the failing one is retried.
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
                for msg, env in batch:
                    with self._span(msg, env):
                        handled += await self._apply(tx, env)
        except Exception:
            for msg, env in batch:
                await self._handle(store, js, msg, env)
            return
        self._count(handled)
        for msg, env in batch:
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
                msgs = await sub.fetch(batch=64, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception:
                if stop.is_set():
                    break
                log.exception("fetch failed; retrying", extra={"alert": "consumer"})
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
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


__all__ = ["EventConsumer", "OutboxRelay", "Position", "connect", "ensure_streams", "subject_for"]


async def _relay_forever(settings: RelaySettings) -> None:
    from .eventstore import make_engine

    store = EventStore(make_engine(settings.database_url, pool_size=2))
    seed = settings.nats_seed_file.read_text().strip() if settings.nats_seed_file else ""
    ca = settings.nats_ca_file.read_bytes() if settings.nats_ca_file else None
    _nc, js = await connect(settings.nats_url, "relay", Credentials(settings.nats_user, seed, ca))
    await ensure_streams(js)
    await OutboxRelay(store, js, batch=50).run(asyncio.Event())


def main() -> int:
    """``python -m services.kernel.bus``: a relay alone, for operators draining a store and
    for the crash test (kill -9). It reads SUBSIDY_DATABASE_URL (and its password file),
    SUBSIDY_NATS_URL and its NATS credential (SUBSIDY_NATS_SEED_FILE, SUBSIDY_NATS_USER,
    SUBSIDY_NATS_CA_FILE) through RelaySettings, like a service reads its own."""
    import sys

    from .settings import SettingsError
    from .telemetry import configure_logging

    try:
        settings = RelaySettings.from_env()
    except SettingsError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    configure_logging("relay", settings.log_level, settings.log_file)
    asyncio.run(_relay_forever(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
