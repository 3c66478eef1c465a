"""A durable consumer whose filter changed between releases, upgraded on start against a real
NATS JetStream and PostgreSQL: no event it handles is lost or applied twice."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from nats.js import JetStreamContext

from services.kernel import bus
from services.kernel.consumer import EventConsumer, filters
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from services.kernel.eventstore import EventStore, Tx
from subsidy.v1 import events_pb2 as ev

CTX = Context(service_actor("test"))


async def publish(
    store: EventStore, js: JetStreamContext, service: str, n: int, first: int = 0
) -> list[str]:
    """``n`` pools funded and assigned (two event types each); the BudgetFunded ids."""
    funded: list[str] = []
    for i in range(first, first + n):
        pool = f"{service}-{i}"
        envs = [
            new_envelope(service, f"budget-pool/{pool}", m, CTX)
            for m in (
                ev.BudgetFunded(pool_id=pool, amount_fen=100 + i),
                ev.PoolAssigned(pool_id=pool, platform_id="jd"),
            )
        ]
        async with store.transaction() as tx:
            await tx.append(f"budget-pool/{pool}", 0, envs)
        funded.append(envs[0].event_id)
    await bus.OutboxRelay(store, js).publish_pending()
    return funded


async def test_a_durable_of_a_wider_filter_is_narrowed_in_place_losing_and_repeating_nothing(
    store: EventStore, js: JetStreamContext
) -> None:
    """The release before consumed ``events.<service>.>``; this one only BudgetFunded. At the
    upgrade the old durable has handled and acked some events, holds some delivered but not
    acked (the old process stopped mid-batch) and some not yet delivered: the new consumer
    updates the durable's filter in place and every BudgetFunded is handled exactly once."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    name = f"c-{service}"
    effects: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        effects.append(env.event_id)
        await tx.append(
            f"effects/{env.event_id}", 0, [new_envelope(service, "e", ev.PoolSharded(), CTX)]
        )

    funded = await publish(store, js, service, 6)
    old = EventConsumer(name, [f"events.{service}.>"], handler)
    sub = await old.subscribe(js)
    msgs = await sub.fetch(8, timeout=5)
    assert len(msgs) == 8
    await old.handle_batch(store, js, msgs[:5])  # handled and acked
    # msgs[5:8] delivered but never acked (the old process died); the rest not yet delivered.
    await sub.unsubscribe()
    assert filters((await js.consumer_info(bus.EVENTS_STREAM, name)).config) == {
        f"events.{service}.>"
    }
    later = await publish(store, js, service, 3, first=6)  # published during the upgrade

    new = EventConsumer(name, [f"events.{service}.BudgetFunded"], handler, ack_wait_s=1.0)
    new.linger_s = 0
    stop = asyncio.Event()
    run = asyncio.create_task(new.run(store, js, stop))
    wanted = set(funded + later)
    for _ in range(200):
        if wanted <= set(effects):
            break
        await asyncio.sleep(0.05)
    # The unacked messages come back after the old durable's ack wait at most.
    info = await js.consumer_info(bus.EVENTS_STREAM, name)
    for _ in range(80):
        if not info.num_ack_pending and not info.num_pending:
            break
        await asyncio.sleep(0.5)
        info = await js.consumer_info(bus.EVENTS_STREAM, name)
    stop.set()
    await run
    assert filters(info.config) == {f"events.{service}.BudgetFunded"}
    assert info.num_pending == 0 and info.num_ack_pending == 0
    # Nothing lost: every BudgetFunded handled; nothing applied twice, PoolAssigned included
    # (the old filter's, handled before the upgrade once, never again after it).
    counts = Counter(effects)
    assert wanted <= set(counts)
    assert all(n == 1 for n in counts.values())
    effect_streams = Counter(
        r.envelope.stream_id
        for r in await store.read_all()
        if r.envelope.stream_id.startswith("effects/")
    )
    assert set(effect_streams) == {f"effects/{i}" for i in counts}
    assert all(n == 1 for n in effect_streams.values())


async def test_a_durable_already_on_its_filter_is_bound_as_it_is(
    store: EventStore, js: JetStreamContext
) -> None:
    """A restart of the same release changes nothing: the durable keeps its position."""
    service = f"svc{uuid.uuid4().hex[:8]}"
    name = f"c-{service}"

    async def handler(tx: Tx, env: Envelope) -> None:
        pass

    await publish(store, js, service, 2)
    consumer = EventConsumer(
        name, [f"events.{service}.BudgetFunded", f"events.{service}.PoolAssigned"], handler
    )
    sub = await consumer.subscribe(js)
    await consumer.handle_batch(store, js, await sub.fetch(4, timeout=5))
    await sub.unsubscribe()
    before = await js.consumer_info(bus.EVENTS_STREAM, name)
    for _ in range(100):  # the acks are sent without waiting for a reply
        if not before.num_ack_pending:
            break
        await asyncio.sleep(0.05)
        before = await js.consumer_info(bus.EVENTS_STREAM, name)
    assert before.num_ack_pending == 0
    sub = await consumer.subscribe(js)
    after = await js.consumer_info(bus.EVENTS_STREAM, name)
    await sub.unsubscribe()
    assert before.created == after.created
    assert after.delivered.stream_seq == before.delivered.stream_seq
    assert after.ack_floor.stream_seq == before.ack_floor.stream_seq
    assert filters(after.config) == set(consumer.subjects)
