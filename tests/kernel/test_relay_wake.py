"""The relay's idle poll backs off while nothing comes, yet a commit is never left waiting for it:
this process's own append wakes the relay at once, another writer's is published within the
longest poll, and another worker's, which announces its commits, wakes it at once too. Real
PostgreSQL and NATS JetStream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from nats.js import JetStreamContext
from sqlalchemy import text

from services.kernel import bus
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

CTX = Context(service_actor("test"))


async def append_one(store: EventStore, service: str) -> None:
    env = new_envelope(service, f"budget-pool/{service}", ev.BudgetFunded(pool_id="p"), CTX)
    async with store.transaction() as tx:
        await tx.append(f"budget-pool/{service}-{env.event_id}", 0, [env])


async def seconds_until_published(relay: bus.OutboxRelay, count: int, within: float) -> float:
    t0 = time.monotonic()
    while relay.published < count:
        assert time.monotonic() - t0 < within, f"not published within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_an_idle_relay_still_publishes_its_own_append_at_once(
    infra: Infra, js: JetStreamContext
) -> None:
    store = EventStore(make_engine(infra.create_database(f"wake{uuid.uuid4().hex[:8]}")))
    await store.create_tables()
    relay, stop = bus.OutboxRelay(store, js), asyncio.Event()
    # A poll that grows to 5 s: only the append's wake can publish within a second.
    task = asyncio.create_task(relay.run(stop, idle_poll_s=0.05, max_idle_poll_s=5.0))
    try:
        await asyncio.sleep(2.0)  # idle: the poll has backed off past a second
        await append_one(store, f"svc{uuid.uuid4().hex[:8]}")
        assert await seconds_until_published(relay, 1, within=5.0) < 1.0
    finally:
        stop.set()
        await task
        await store.engine.dispose()


async def test_another_writers_append_is_published_within_the_longest_poll(
    infra: Infra, js: JetStreamContext
) -> None:
    url = infra.create_database(f"wake{uuid.uuid4().hex[:8]}")
    store = EventStore(make_engine(url))
    await store.create_tables()
    other = EventStore(make_engine(url))  # another process's store: its commits wake no one here
    relay, stop = bus.OutboxRelay(store, js), asyncio.Event()
    task = asyncio.create_task(relay.run(stop, idle_poll_s=0.05, max_idle_poll_s=0.4))
    try:
        await asyncio.sleep(1.5)  # idle: the poll is at its longest
        await append_one(other, f"svc{uuid.uuid4().hex[:8]}")
        await seconds_until_published(relay, 1, within=3.0)
        await append_one(store, f"svc{uuid.uuid4().hex[:8]}")  # and its own, after
        await seconds_until_published(relay, 2, within=3.0)
    finally:
        stop.set()
        await task
        await store.engine.dispose()
        await other.engine.dispose()


async def wait_until(condition: Callable[[], bool], within: float) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < within, f"not so within {within} s"
        await asyncio.sleep(0.02)


async def test_another_workers_append_wakes_the_listening_relay_at_once_and_is_published_once(
    infra: Infra, js: JetStreamContext
) -> None:
    url = infra.create_database(f"wake{uuid.uuid4().hex[:8]}")
    # Two workers of one service: the leader's store and relay, and a worker that only
    # appends. Both announce their commits (app.start calls wake_across_processes in each).
    store = EventStore(make_engine(url))
    await store.create_tables()
    other = EventStore(make_engine(url), across_processes=True)
    relay, stop = bus.OutboxRelay(store, js), asyncio.Event()
    relay.wake_across_processes()
    # A poll that grows to 5 s: only the other worker's announcement can publish within 1 s.
    task = asyncio.create_task(relay.run(stop, idle_poll_s=0.05, max_idle_poll_s=5.0))
    try:
        await wait_until(lambda: store.listening, within=10.0)
        await asyncio.sleep(2.0)  # idle: the poll has backed off past a second
        await append_one(other, f"svc{uuid.uuid4().hex[:8]}")  # in a transaction (Tx.append)
        assert await seconds_until_published(relay, 1, within=5.0) < 1.0
        await asyncio.sleep(2.0)
        service = f"svc{uuid.uuid4().hex[:8]}"  # and through group commit (EventStore.append)
        env = new_envelope(service, f"p/{service}", ev.BudgetFunded(pool_id="p"), CTX)
        await other.append(f"p/{service}", 0, [env])
        assert await seconds_until_published(relay, 2, within=5.0) < 1.0
        await asyncio.sleep(1.0)  # a second publish of either, were there one, shows here
        assert relay.published == 2
    finally:
        stop.set()
        await task
        await store.engine.dispose()
        await other.engine.dispose()
    assert not store.listening


async def test_a_relay_whose_listening_session_dies_listens_again_and_polls_meanwhile(
    infra: Infra, js: JetStreamContext
) -> None:
    url = infra.create_database(f"wake{uuid.uuid4().hex[:8]}")
    store = EventStore(make_engine(url))
    await store.create_tables()
    other = EventStore(make_engine(url), across_processes=True)
    relay, stop = bus.OutboxRelay(store, js), asyncio.Event()
    relay.wake_across_processes()
    task = asyncio.create_task(relay.run(stop, idle_poll_s=0.05, max_idle_poll_s=5.0))
    try:
        await wait_until(lambda: store.listening, within=10.0)
        async with other.engine.connect() as conn:
            killed = await conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            )
        assert killed == 1
        await wait_until(lambda: not store.listening, within=5.0)
        await wait_until(lambda: store.listening, within=10.0)  # listening again
        await asyncio.sleep(2.0)
        await append_one(other, f"svc{uuid.uuid4().hex[:8]}")
        assert await seconds_until_published(relay, 1, within=5.0) < 1.0
    finally:
        stop.set()
        await task
        await store.engine.dispose()
        await other.engine.dispose()
