"""Outbox relay and durable consumers against a real NATS JetStream and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import text

from services.kernel import bus
from services.kernel.consumer import EventConsumer
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from services.kernel.eventstore import EventStore, Tx, make_engine
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

CTX = Context(service_actor("test"))


def relay_credential_files(infra: Infra) -> dict[str, str]:
    """The stand-alone relay's NATS settings: the operator's seed and the CA, in files."""
    operator = infra.nats_credentials()
    seed, ca = infra.root / f"relay-{uuid.uuid4().hex[:8]}.nk", infra.root / "nats-ca.pem"
    seed.write_text(operator.seed)
    seed.chmod(0o600)
    ca.write_bytes(infra.bao.ca_pem)
    return {"SUBSIDY_NATS_SEED_FILE": str(seed), "SUBSIDY_NATS_CA_FILE": str(ca)}


def funded(service: str, pool: str, fen: int) -> Envelope:
    env = new_envelope(
        service, f"budget-pool/{pool}", ev.BudgetFunded(pool_id=pool, amount_fen=fen), CTX
    )
    return env


async def published_ids(js: JetStreamContext, service: str) -> list[str]:
    """Every event id JetStream holds for ``service``, in stream order (duplicates kept)."""
    sub = await js.subscribe(
        f"events.{service}.>",
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    ids: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                return ids
            ids.append(Envelope.FromString(msg.data).event_id)
    finally:
        await sub.unsubscribe()


async def fill(store: EventStore, service: str, n: int) -> list[str]:
    ids: list[str] = []
    for chunk in range(0, n, 100):
        envs = [funded(service, f"p{i}", i + 1) for i in range(chunk, min(n, chunk + 100))]
        async with store.transaction() as tx:
            for env in envs:
                await tx.append(f"budget-pool/{service}-{env.event_id}", 0, [env])
        ids += [e.event_id for e in envs]
    return ids


async def test_relay_publishes_every_event_once_with_msg_id(
    store: EventStore, js: JetStreamContext
) -> None:
    service = f"svc{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 120)
    relay = bus.OutboxRelay(store, js, batch=50)
    assert await relay.publish_pending() == 120
    # A crash after publishing but before the checkpoint would publish again: JetStream drops it.
    await store.save_checkpoint("relay", bus.Position(0, 0))
    assert await bus.OutboxRelay(store, js).publish_pending() == 120
    assert await published_ids(js, service) == ids


async def test_a_refused_event_mid_batch_holds_what_follows_and_keeps_what_went_before(
    store: EventStore, js: JetStreamContext
) -> None:
    # The relay sends a batch without waiting for each ack: an event the bus refuses in the
    # middle of one still lets nothing after it out, and what went before it is published
    # and its position saved (a restarted relay starts at the refused event).
    service = f"svc{uuid.uuid4().hex[:8]}"
    before = await fill(store, service, 3)
    huge = funded(service, "p-huge", 1)
    huge.payload = b"x" * 1_200_000  # over NATS' max_payload: refused before it is sent
    huge.stream_version = 1
    async with store.transaction() as tx:  # written past append's bound, as an old event
        await tx.conn.execute(
            text(
                "INSERT INTO events (event_id, stream_id, stream_version, event_type, envelope)"
                " VALUES (:e, :s, 1, :t, :b)"
            ),
            {
                "e": huge.event_id,
                "s": f"budget-pool/{service}-huge",
                "t": huge.event_type,
                "b": huge.SerializeToString(),
            },
        )
    after = await fill(store, service, 2)
    name = f"relay-{service}"
    relay = bus.OutboxRelay(store, js, name=name, batch=50)
    with pytest.raises(bus.RelayStuck):
        await relay.publish_pending()
    assert relay.stuck is not None and relay.stuck[0] == huge.event_id
    assert await published_ids(js, service) == before
    saved = await store.load_checkpoint(name)
    assert [r.envelope.event_id for r in await store.read_all(saved, limit=10)] == [
        huge.event_id,
        *after,
    ]


@pytest.mark.slow
async def test_relay_killed_mid_stream_loses_nothing(infra: Infra, js: JetStreamContext) -> None:
    """kill -9 the relay process mid-stream; a restarted relay publishes the rest, none lost."""
    url = infra.create_database("relaykill")
    store = EventStore(make_engine(url))
    await store.create_tables()
    service = f"kill{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 3000)
    cmd = [sys.executable, "-m", "services.kernel.bus"]
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "SUBSIDY_DATABASE_URL": url,
        "SUBSIDY_NATS_URL": infra.nats.url,
        **relay_credential_files(infra),
    }
    proc = await asyncio.create_subprocess_exec(*cmd, env=env)
    try:
        for _ in range(400):
            await asyncio.sleep(0.05)
            info = await js.stream_info(bus.EVENTS_STREAM)
            if (await store.load_checkpoint("relay")).position > 0:
                break
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        partial = len(await published_ids(js, service))
        assert 0 < partial < 3000, f"kill landed outside the stream ({partial} published)"
        proc = await asyncio.create_subprocess_exec(*cmd, env=env)
        for _ in range(600):
            await asyncio.sleep(0.1)
            if len(await published_ids(js, service)) >= 3000:
                break
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
    assert info is not None
    got = await published_ids(js, service)
    assert sorted(got) == sorted(ids)  # every event, none twice
    await store.engine.dispose()


async def test_consumer_redelivery_changes_nothing(store: EventStore, js: JetStreamContext) -> None:
    service = f"svc{uuid.uuid4().hex[:8]}"
    await fill(store, service, 5)
    await bus.OutboxRelay(store, js).publish_pending()
    effects: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        effects.append(env.event_id)

    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], handler)
    sub = await consumer.subscribe(js)
    msgs = await sub.fetch(5, timeout=5)
    for msg in msgs:
        await consumer.handle(store, js, msg)
    # Redeliver the very same messages (as after a lost ack): the handler must not run again.
    for msg in msgs:
        msg._ackd = False  # the client refuses a second ack otherwise
        await consumer.handle(store, js, msg)
    assert len(effects) == 5 and len(set(effects)) == 5


async def test_a_batch_is_marked_at_once_each_event_handled_once_and_a_failure_fails_alone(
    store: EventStore, js: JetStreamContext
) -> None:
    """A fetched batch's handled marks are one statement: events handled before (a redelivery)
    and an event given twice in one batch run the handler once; a handler failing on one event
    rolls the batch back, and then the others commit one by one while it alone is retried."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 6)
    await bus.OutboxRelay(store, js).publish_pending()
    calls: list[str] = []
    poison = ids[4]

    async def handler(tx: Tx, env: Envelope) -> None:
        calls.append(env.event_id)
        await tx.append(f"effects/{env.event_id}", 0, [funded(service, "e", 1)])
        if env.event_id == poison:
            raise RuntimeError("this event's handler fails")

    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], handler)
    sub = await consumer.subscribe(js)
    msgs = await sub.fetch(6, timeout=5)
    assert len(msgs) == 6
    for msg in msgs[:2]:  # handled (and marked) before the batch comes
        await consumer.handle(store, js, msg)
    for msg in msgs[:2]:
        msg._ackd = False  # redelivered, as after a lost ack
    calls.clear()
    await consumer.handle_batch(store, js, [*msgs, msgs[2]])
    # The batch ran each new event once (the twice-given one too) up to the failing one; then
    # each alone: the marked ones not again, the rolled-back ones and the poison once more.
    assert calls == [ids[2], ids[3], ids[4], ids[2], ids[3], ids[4], ids[5]]
    assert consumer.handled == 5
    effect_streams = [
        r.envelope.stream_id
        for r in await store.read_all()
        if r.envelope.stream_id.startswith("effects/")
    ]
    # The failed event's effect was rolled back; every other event's committed once.
    assert sorted(effect_streams) == sorted(f"effects/{i}" for i in ids if i != poison)
    async with store.transaction() as tx:
        assert await tx.mark_handled_many(consumer.name, ids) == {poison}


async def test_a_batch_handler_gets_the_new_events_at_once_and_a_failure_falls_back_to_each(
    store: EventStore, js: JetStreamContext
) -> None:
    """With a batch handler the batch's new events (in fetch order, each once, none handled
    before) go to it in one call; when it fails the batch rolls back and each event is handled
    alone by the per-event handler, so only the failing one is retried."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 6)
    await bus.OutboxRelay(store, js).publish_pending()
    batches: list[list[str]] = []
    alone: list[str] = []
    fail_batches = False

    async def handler(tx: Tx, env: Envelope) -> None:
        alone.append(env.event_id)
        if env.event_id == ids[5]:
            raise RuntimeError("this event's handler fails")

    async def batch_handler(tx: Tx, envs: list[Envelope]) -> None:
        batches.append([env.event_id for env in envs])
        if fail_batches:
            raise RuntimeError("the batch fails")

    consumer = EventConsumer(
        f"c-{service}", [f"events.{service}.>"], handler, batch_handler=batch_handler
    )
    sub = await consumer.subscribe(js)
    msgs = await sub.fetch(6, timeout=5)
    assert len(msgs) == 6
    await consumer.handle(store, js, msgs[0])  # handled before the batch comes
    msgs[0]._ackd = False  # redelivered, as after a lost ack
    await consumer.handle_batch(store, js, [*msgs[:4], msgs[2]])
    assert batches == [ids[1:4]] and alone == [ids[0]]
    assert consumer.handled == 4
    fail_batches = True
    await consumer.handle_batch(store, js, msgs[4:])
    # The batch call failed and rolled back; then each alone: the fifth commits, the sixth fails.
    assert batches == [ids[1:4], ids[4:6]] and alone == [ids[0], ids[4], ids[5]]
    assert consumer.handled == 5
    async with store.transaction() as tx:
        assert await tx.mark_handled_many(consumer.name, ids) == {ids[5]}


async def test_handler_failure_rolls_back_its_effects_and_the_handled_mark(
    store: EventStore, js: JetStreamContext
) -> None:
    service = f"svc{uuid.uuid4().hex[:8]}"
    await fill(store, service, 1)
    await bus.OutboxRelay(store, js).publish_pending()
    calls = 0

    async def flaky(tx: Tx, env: Envelope) -> None:
        nonlocal calls
        calls += 1
        await tx.append(f"effects/{env.event_id}", tx.appended, [funded(service, "e", 1)])
        if calls == 1:
            raise RuntimeError("transient")

    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], flaky)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(store, js, stop))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if consumer.handled:
            break
    stop.set()
    await task
    assert calls == 2 and consumer.handled == 1
    effects = [r for r in await store.read_all() if r.envelope.stream_id.startswith("effects/")]
    assert len(effects) == 1  # the failed attempt's effect was rolled back


async def test_poison_message_goes_to_dead_letter_after_bounded_retries(
    store: EventStore, js: JetStreamContext
) -> None:
    service = f"svc{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 2)
    await bus.OutboxRelay(store, js).publish_pending()
    attempts: dict[str, int] = {}

    async def poison(tx: Tx, env: Envelope) -> None:
        attempts[env.event_id] = attempts.get(env.event_id, 0) + 1
        if env.event_id == ids[0]:
            raise ValueError("cannot handle this event")

    consumer = EventConsumer(
        f"c-{service}", [f"events.{service}.>"], poison, max_deliver=3, _backoff=(0.05,)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(store, js, stop))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if consumer.dead_lettered and consumer.handled:
            break
    stop.set()
    await task
    # Bounded: dead-lettered on its third delivery. (A delivery fetched together with other
    # messages may run the handler twice: once in the batch, once alone.)
    assert 3 <= attempts[ids[0]] <= 6
    assert consumer.handled == 1 and consumer.dead_lettered == 1
    dlq = await js.subscribe(f"dlq.c-{service}", ordered_consumer=True)
    msg = await dlq.next_msg(timeout=5)
    assert Envelope.FromString(msg.data).event_id == ids[0]
    assert msg.headers is not None and msg.headers["Subsidy-Error"] == "ValueError"
    await dlq.unsubscribe()


async def dead_letters(js: JetStreamContext, consumer: str, n: int) -> list[Msg]:
    """The first ``n`` messages of ``consumer``'s dead-letter subject (fails if fewer)."""
    sub = await js.subscribe(f"dlq.{consumer}", ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=5) for _ in range(n)]
    finally:
        await sub.unsubscribe()


async def test_an_undecodable_message_is_dead_lettered_at_once_and_the_consumer_lives_on(
    store: EventStore, js: JetStreamContext
) -> None:
    """Garbage on a consumed subject once killed the consumer for good (decoded outside any
    protection, and redelivered forever after a restart); now it goes straight to the DLQ."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    junk = b"not a protobuf"
    await js.publish(f"events.{service}.Junk", junk)  # fetched in one batch with valid events
    ids = await fill(store, service, 3)
    await bus.OutboxRelay(store, js).publish_pending()
    seen: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        seen.append(env.event_id)

    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], handler)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(store, js, stop))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if (consumer.handled == 3 and consumer.dead_lettered == 1) or task.done():
                break
        assert not task.done(), task.exception() if task.done() else None
        assert seen == ids and consumer.dead_lettered == 1
        # Then empty bytes (an envelope without an event id), fetched alone, and one more event.
        await js.publish(f"events.{service}.Junk", b"")
        await asyncio.sleep(0.3)
        more = await fill(store, service, 1)
        await bus.OutboxRelay(store, js).publish_pending()
        for _ in range(200):
            await asyncio.sleep(0.05)
            if (consumer.handled == 4 and consumer.dead_lettered == 2) or task.done():
                break
        assert not task.done(), task.exception() if task.done() else None
        assert seen == ids + more and consumer.dead_lettered == 2
    finally:
        stop.set()
        await task
    dlq = await dead_letters(js, consumer.name, 2)
    assert [m.data for m in dlq] == [junk, b""]
    for m in dlq:
        assert m.headers is not None and m.headers["Subsidy-Error"] == "DecodeError"
        assert m.headers["Subsidy-Original-Subject"] == f"events.{service}.Junk"
        assert not any(junk.decode() in v for v in m.headers.values())  # content stays out


async def test_a_nats_error_while_acking_or_dead_lettering_ends_nothing(
    infra: Infra, store: EventStore, js: JetStreamContext
) -> None:
    """A lost connection while acking must not dead-letter a handled event nor raise; one while
    dead-lettering must not raise either: JetStream redelivers, and the next try succeeds."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    ids = await fill(store, service, 2)
    await bus.OutboxRelay(store, js).publish_pending()
    runs: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        runs.append(env.event_id)
        if env.event_id == ids[1]:
            raise ValueError("poison")

    consumer = EventConsumer(
        f"c-{service}", [f"events.{service}.>"], handler, max_deliver=1, ack_wait_s=1.0
    )
    nc2, js2 = await bus.connect(infra.nats.url, "test-lost", infra.nats_credentials())
    sub = await consumer.subscribe(js2)
    first = await sub.fetch(2, timeout=5)
    await nc2.close()  # the connection the messages came on, and dead-letters would go out on
    for msg in first:
        await consumer.handle(store, js2, msg)  # must not raise
    assert (consumer.handled, consumer.dead_lettered) == (1, 0)
    # Redelivered after ack_wait on a working connection: handled once, dead-lettered once.
    sub = await consumer.subscribe(js)
    again = await sub.fetch(2, timeout=10)
    assert sorted(Envelope.FromString(m.data).event_id for m in again) == sorted(ids)
    for msg in again:
        await consumer.handle(store, js, msg)
    assert (consumer.handled, consumer.dead_lettered) == (1, 1)
    assert runs.count(ids[0]) == 1  # the redelivery of the handled event changed nothing
    [dead] = await dead_letters(js, consumer.name, 1)
    assert Envelope.FromString(dead.data).event_id == ids[1]
    await sub.unsubscribe()
