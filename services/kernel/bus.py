"""NATS JetStream: the streams, the connection and the outbox relay (the durable consumers are
in services/kernel/consumer.py).

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
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry.trace import SpanKind

from subsidy.v1 import events_pb2 as ev

from . import faults, metrics
from .background import pause
from .events import Envelope
from .eventstore import APPENDED_CHANNEL, EventStore, Position, Recorded
from .natsauth import Credentials
from .settings import RelaySettings
from .sql import driver
from .telemetry import extract, inject, tracer

log = logging.getLogger(__name__)

EVENTS_STREAM = "SUBSIDY_EVENTS"
DLQ_STREAM = "SUBSIDY_DLQ"
DUPLICATE_WINDOW_S = 600.0
# How long the relay waits for a sent event's ack: what js.publish waits (connect's timeout).
ACK_TIMEOUT_S = 10.0


def subject_for(envelope: Envelope) -> str:
    return f"events.{envelope.service}.{envelope.event_type.rsplit('.', 1)[-1]}"


async def connect(
    url: str, name: str, credentials: Credentials
) -> tuple[NatsClient, JetStreamContext]:
    """Connect over TLS (the server's certificate verified against ``credentials.ca_pem``)
    as ``credentials.user``, signing the server's nonce with its nkey seed. ``url`` may name
    several servers, comma-separated (a cluster's nodes: the client fails over between them)."""
    nc = await nats.connect(
        [u.strip() for u in url.split(",") if u.strip()],
        name=name,
        tls=credentials.ssl_context(),
        nkeys_seed_str=credentials.seed or None,
        # Replies come back on the user's own inbox prefix, the only one it may subscribe to.
        inbox_prefix=credentials.inbox_prefix,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        # The client reconnects by itself; what it meets on the way is one line each, not
        # nats-py's default (an ERROR with a traceback for every failed reconnect).
        error_cb=_nats_error,
        disconnected_cb=_nats_disconnected,
        reconnected_cb=_nats_reconnected,
    )
    return nc, nc.jetstream(timeout=ACK_TIMEOUT_S)


async def _nats_error(exc: Exception) -> None:
    if faults.transient_part(exc) is None and not isinstance(exc, OSError):
        log.error("NATS client error: %s", type(exc).__name__, extra={"alert": "nats"})
    else:
        log.warning("NATS: %s; reconnecting", type(exc).__name__)


async def _nats_disconnected() -> None:
    log.warning("NATS connection lost; reconnecting")


async def _nats_reconnected() -> None:
    log.info("NATS reconnected")


class StreamsNotReady(RuntimeError):
    """A stream is missing or differs from what the platform needs, and this credential may
    not create or change streams (only the operator's may)."""


def _differs(have: StreamConfig, want: StreamConfig, replicas: bool = True) -> bool:
    """True if ``have`` lacks something ``want`` asks for (an unset field: the server's
    default, e.g. the dead-letter stream's duplicate window); the replica count only when
    ``replicas``."""
    checked = ("subjects", "storage", "duplicate_window", *(("num_replicas",) if replicas else ()))
    return any(getattr(want, f) and getattr(have, f) != getattr(want, f) for f in checked)


async def ensure_streams(js: JetStreamContext, *, replicas: int | None = 1) -> None:
    """Create the events and dead-letter streams, or update one that differs; idempotent.

    Only the operator's credential may create or change a stream: with a service's, a stream
    that exists as configured passes (a read), and anything else raises StreamsNotReady.
    ``replicas`` None (a service's check): how many replicas the streams have is the
    operator's choice (1 for one server, 3 for a cluster), any number passes."""
    for cfg in (
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["events.>"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas or 1,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=["dlq.>"],
            storage=StorageType.FILE,
            num_replicas=replicas or 1,
        ),
    ):
        try:
            try:
                info = await js.stream_info(cfg.name)  # type: ignore[arg-type]
            except NotFoundError:
                await js.add_stream(cfg)
                continue
            if _differs(info.config, cfg, replicas is not None):
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


def _done() -> asyncio.Future[PubAck]:
    """An ack that is already there (an event an operator skipped is not sent)."""
    ack: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
    ack.set_result(PubAck(stream=EVENTS_STREAM, seq=0))
    return ack


async def _acked(ack: asyncio.Future[PubAck]) -> None:
    """Wait for a sent event's ack as ``js.publish`` waits for it: an ack that does not come
    within ACK_TIMEOUT_S is nats' TimeoutError (an outage, retried)."""
    try:
        await asyncio.wait_for(asyncio.shield(ack), ACK_TIMEOUT_S)
    except TimeoutError:
        raise nats.errors.TimeoutError from None


class RelayStuck(RuntimeError):
    """The relay cannot publish an event the bus refuses; it holds every later one."""


class OutboxRelay:
    """Publishes a store's events to JetStream in the global order, resuming after a crash."""

    def __init__(
        self, store: EventStore, js: JetStreamContext, *, name: str = "relay", batch: int = 256
    ) -> None:
        self._store = store
        self._js = js
        self.js = js  # the operator interface reads the dead-letter stream with it
        self._name = name
        self._batch = batch
        self.published = 0
        self._pos: Position | None = None  # only this relay writes its checkpoint
        # The event the bus refuses (too large, not allowed), and why: while set, nothing after
        # it is published, health is NOT_SERVING, and only an operator's skip moves on.
        self.stuck: tuple[str, str] | None = None
        self.on_stuck: Callable[[bool], Awaitable[None]] | None = None
        # Called with the part's name when a publish met an outage (the health watch probes).
        self.on_outage: Callable[[str], None] | None = None
        # Woken by a commit, wait this long before reading, so that the commits of the next
        # few milliseconds share the pass: one outbox read and one checkpoint for all of them,
        # not one each (the checkout's statement log showed both once per event in the ledger
        # and eligibility). It delays an event's publication by this much at most; a backlog
        # (full batches) is read on without waiting.
        self.linger_s = 0.02

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
            # Each event is sent without waiting for its ack, then the acks are awaited in
            # order: one round trip to JetStream per batch, not one per event (the relay's
            # share of a checkout's CPU was mostly those waits' wake-ups). The order is kept:
            # the messages go out on one connection in order, and the position only moves
            # past an event once its own ack and every earlier one's came back. A refusal
            # the client raises (too large, bad subject) is raised before the message is sent,
            # so nothing after it goes out, as before.
            acks: list[tuple[Recorded, asyncio.Future[PubAck]]] = []
            try:
                for rec in batch:
                    try:
                        acks.append((rec, await self._send(rec.envelope)))
                    except REFUSED_BY_THE_BUS as exc:
                        await self._skip_or_stick(pos, acks, rec.envelope, exc)
                        acks.append((rec, _done()))
                for rec, ack in acks:
                    try:
                        await _acked(ack)
                    except REFUSED_BY_THE_BUS as exc:
                        # A refusal JetStream itself answers (BadRequest) comes after the
                        # later events of the batch went out; this stream sets nothing it
                        # would refuse them for (no message size, no expected headers).
                        await self._skip_or_stick(pos, [], rec.envelope, exc)
                    pos = rec.position
            finally:
                for _, ack in acks:
                    ack.cancel()  # an ack never awaited (a failure) frees the client's slot
            await self._save(pos)
            await self._unstick()
            metrics.EVENTS_PUBLISHED.inc(len(batch))
            sent += len(batch)
            self.published += len(batch)
            if len(batch) < self._batch:
                # All that was visible: no second, empty read each time the relay wakes (the
                # checkout's profile showed it). What commits later sets the store's
                # ``appended``, which run() cleared before this pass, so it is not missed.
                return sent

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

    async def refresh_lag(self) -> tuple[int, float]:
        """Set the relay's lag gauges from the store (a background refresh, never the relay's
        own loop); returns (unpublished events, age in seconds of the oldest)."""
        pos = self._pos if self._pos is not None else await self._store.load_checkpoint(self._name)
        count, age = await self._store.backlog(pos)
        metrics.RELAY_BACKLOG.set(count)
        metrics.RELAY_BACKLOG_AGE.set(age)
        return count, age

    async def publish_pending_soon(self) -> None:
        """Wake the relay's loop now (after a skip) instead of at its next retry."""
        self._store.appended.set()

    def wake_across_processes(self) -> None:
        """Several processes append to this relay's database (SUBSIDY_WORKERS > 1), and only
        one of them runs the relay: call it in every one of them. Each process's store then
        announces its commits (a NOTIFY after each, EventStore.across_processes), and the
        relay, wherever it runs, LISTENs on a connection of its own, so another worker's
        event wakes it as its own process's does and its idle poll backs off as one worker's
        does (it stays at its shortest while it is not listening: the database was down)."""
        self._store.across_processes = True

    async def _listen(self) -> None:
        """Wake the relay on every announced commit, until cancelled; a connection lost is
        taken again after a second (meanwhile the relay polls at its shortest)."""
        store = self._store
        while True:
            try:
                async with store.engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    raw = await driver(conn)
                    try:
                        await raw.execute(f"LISTEN {APPENDED_CHANNEL}")
                        store.listening = True
                        # What the others committed before the LISTEN took: one pass reads it.
                        store.appended.set()
                        async for _ in raw.notifies():
                            store.appended.set()
                    finally:
                        store.listening = False
                        # Never back into the pool still listening.
                        await conn.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay: not listening for other processes' commits (%s)", exc)
            await asyncio.sleep(1.0)

    async def skipped(self) -> set[str]:
        """The events operators let the relay past (their OutboxEventSkipped events)."""
        return {
            ev.OutboxEventSkipped.FromString(e.payload).event_id
            for e in await self._store.read_stream(SKIPS_STREAM)
        }

    async def _skip_or_stick(
        self,
        pos: Position,
        sent: list[tuple[Recorded, asyncio.Future[PubAck]]],
        env: Envelope,
        exc: Exception,
    ) -> None:
        """An event the bus refuses: if an operator skipped it, return (the relay moves on);
        else save the position of what went before it and raise RelayStuck. The events sent
        ahead of it are awaited first, so that the saved position is theirs (a refusal at send
        time is raised before its own message goes out)."""
        if env.event_id in await self.skipped():
            log.warning(
                "not publishing event %s: an operator skipped it",
                env.event_id,
                extra={"event_id": env.event_id},
            )
            return
        for rec, ack in sent:
            await _acked(ack)
            pos = rec.position
        await self._save(pos)  # what went before it is published
        await self._stick(env, exc)
        raise RelayStuck(env.event_id) from exc

    async def _send(self, env: Envelope) -> asyncio.Future[PubAck]:
        """Send one event to JetStream; the future is its ack (awaited with :func:`_acked`)."""
        with tracer().start_as_current_span(
            f"publish {env.event_type.rsplit('.', 1)[-1]}",
            context=extract(env.trace_context),
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.message.id": env.event_id},
        ):
            headers = {"Nats-Msg-Id": env.event_id, **inject()}
            return await self._js.publish_async(
                subject_for(env), env.SerializeToString(deterministic=True), headers=headers
            )

    async def run(
        self, stop: asyncio.Event, idle_poll_s: float = 0.1, max_idle_poll_s: float = 1.0
    ) -> None:
        """Relay until ``stop``; wakes on an in-process append, polls for other writers.

        The poll starts at ``idle_poll_s`` after a pass that published and doubles up to
        ``max_idle_poll_s`` while nothing comes: in the checkout's profile the audit and
        catalog relays spent 5 to 8 % of their process's CPU reading an empty outbox ten times
        a second. This process's own appends still wake it at once; another writer's (a
        stand-alone relay's store, a second process) wait one poll at most, unless they
        announce their commits (:meth:`wake_across_processes`): then they wake it too."""
        listener = (
            asyncio.create_task(self._listen(), name="relay-listen")
            if self._store.across_processes
            else None
        )
        try:
            await self._run(stop, idle_poll_s, max_idle_poll_s)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def _run(self, stop: asyncio.Event, idle_poll_s: float, max_idle_poll_s: float) -> None:
        waiting_for: str | None = None  # the part that is down, logged once per outage
        poll_s = idle_poll_s
        store = self._store
        while not stop.is_set():
            # Cleared before the pass, not after: an append that commits while it publishes
            # wakes the next pass at once instead of waiting for the idle poll.
            self._store.appended.clear()
            try:
                sent = await self.publish_pending()
                # Other processes' commits that nothing announces wake no one: poll them often.
                longest = (
                    idle_poll_s
                    if store.across_processes and not store.listening
                    else max_idle_poll_s
                )
                poll_s = idle_poll_s if sent else min(poll_s * 2, longest)
                waiting_for = None
            except RelayStuck:
                await pause(stop, 1.0)  # logged once when it stuck; tried again each second
            except Exception as exc:
                part = faults.transient_part(exc)
                if part is None:
                    log.exception("relay failed; retrying", extra={"alert": "relay"})
                else:  # an outage, not a fault of the relay's: the health watch reports it
                    if part != waiting_for:
                        log.warning("relay paused: the %s is down; retrying until it is back", part)
                    if self.on_outage is not None:
                        self.on_outage(part)
                waiting_for = part
                await pause(stop, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store.appended.wait(), poll_s)
                if self.linger_s > 0:
                    await asyncio.sleep(self.linger_s)  # stop is checked at the loop


__all__ = ["OutboxRelay", "Position", "connect", "ensure_streams", "subject_for"]


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
