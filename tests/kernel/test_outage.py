"""A transient fault is never a poison message: a consumer's PostgreSQL down for 30 s.

The consumer's own real PostgreSQL (not the session's, which other tests share) is stopped
through the local stack's code while events keep arriving, and started again half a minute
later. With the default ``max_deliver`` of 5, every valid event would have been dead-lettered
within seconds had the outage counted as the event's failure; instead each is handled exactly
once after the database is back, and only the one event whose handler refuses it for a reason
of its own is dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from sqlalchemy import text

from services.kernel import bus
from services.kernel.consumer import EventConsumer
from services.kernel.events import Envelope
from services.kernel.eventstore import EventStore, Tx, make_engine
from services.kernel.health import database_probe
from subsidyctl.stack import Postgres, free_port
from tests.kernel.test_bus import dead_letters, fill, funded

OUTAGE_S = 30.0


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[Postgres]:
    pg = Postgres(
        data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "logs", durable=False
    )
    pg.start()
    pg.create_databases(["consumer"])
    try:
        yield pg
    finally:
        pg.stop()


async def wait_for(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {within:.0f} s")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_database_outage_of_30_s_dead_letters_nothing_and_loses_nothing(
    own_pg: Postgres, store: EventStore, js: JetStreamContext
) -> None:
    target = EventStore(make_engine(own_pg.url("consumer"), pool_size=2))
    await target.create_tables()
    service = f"out{uuid.uuid4().hex[:8]}"
    before = await fill(store, service, 10)
    poison = (await fill(store, service, 1))[0]  # refused by its handler, every time
    await bus.OutboxRelay(store, js).publish_pending()
    runs: dict[str, int] = {}

    async def handler(tx: Tx, env: Envelope) -> None:
        runs[env.event_id] = runs.get(env.event_id, 0) + 1
        if env.event_id == poison:
            raise ValueError("this event cannot be handled")
        # The handler's effect, written in the consumer's database with the handled mark.
        await tx.append(f"effects/{env.event_id}", 0, [funded(service, "effect", 1)])

    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], handler, _backoff=(0.05,))
    probe = database_probe(target.engine, timeout_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(target, js, stop))
    try:
        await wait_for(lambda: consumer.handled == 10 and consumer.dead_lettered == 1, 30, "ready")
        assert await probe()

        own_pg.stop()  # the consumer's database is down: refused, terminated connections
        assert not await probe()
        during = await fill(store, service, 20)  # events keep arriving meanwhile
        await bus.OutboxRelay(store, js).publish_pending()
        await asyncio.sleep(OUTAGE_S)
        assert not task.done()
        assert consumer.handled == 10 and consumer.dead_lettered == 1
        assert consumer.outages >= 20  # the new events met the outage, again and again
        retried = [consumer.outage_deliveries.get(i, 0) for i in during]
        assert min(retried) > consumer.max_deliver  # each beyond the limit, and none dead

        own_pg.start()
        await wait_for(lambda: consumer.handled == 30, 60, "caught up")
        assert await probe()
    finally:
        stop.set()
        await task
    assert consumer.dead_lettered == 1
    async with target.engine.connect() as conn:
        marks = await conn.scalar(
            text("SELECT count(*) FROM handled_events WHERE consumer = :c"), {"c": consumer.name}
        )
        effects = await conn.scalar(
            text("SELECT count(DISTINCT stream_id) FROM events WHERE stream_id LIKE 'effects/%'")
        )
    assert marks == 30 and effects == 30  # every valid event handled, each once
    [dead] = await dead_letters(js, consumer.name, 1)
    assert Envelope.FromString(dead.data).event_id == poison  # and nothing else
    more = await js.subscribe(f"dlq.{consumer.name}", ordered_consumer=True)
    try:
        await more.next_msg(timeout=1)  # the poison one
        with pytest.raises(Exception):  # noqa: B017 - a timeout: there is no second one
            await more.next_msg(timeout=1)
    finally:
        await more.unsubscribe()
    assert set(before + during) <= set(runs)
    assert consumer.outage_deliveries == {}  # forgotten once handled
    await target.engine.dispose()
