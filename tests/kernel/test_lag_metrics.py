"""Relay lag and consumer lag as Prometheus gauges, against a real PostgreSQL and JetStream."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.kernel import bus
from services.kernel.consumer import EventConsumer, keep_lag_metrics
from services.kernel.events import Envelope
from services.kernel.eventstore import EventStore, Tx
from tests.kernel.test_bus import fill


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def nothing(tx: Tx, env: Envelope) -> None:
    return None


async def test_relay_lag_counts_unpublished_events_and_the_oldest_ones_age(
    store: EventStore,
    js: JetStreamContext,
) -> None:
    relay = bus.OutboxRelay(store, js)
    assert await relay.refresh_lag() == (0, 0.0)
    service = f"lag{uuid.uuid4().hex[:8]}"
    await fill(store, service, 7)
    await asyncio.sleep(0.3)
    count, age = await relay.refresh_lag()
    assert count == 7 and age >= 0.25
    assert gauge("subsidy_relay_unpublished_events") == 7
    assert (gauge("subsidy_relay_oldest_unpublished_age_seconds") or 0) >= 0.25
    assert await relay.publish_pending() == 7
    assert await relay.refresh_lag() == (0, 0.0)
    assert gauge("subsidy_relay_unpublished_events") == 0


async def test_consumer_lag_is_pending_and_ack_pending_per_durable_consumer(
    store: EventStore,
    js: JetStreamContext,
) -> None:
    service = f"lag{uuid.uuid4().hex[:8]}"
    consumer = EventConsumer(f"c-{service}", [f"events.{service}.>"], nothing)
    sub = await consumer.subscribe(js)
    await fill(store, service, 5)
    assert await bus.OutboxRelay(store, js).publish_pending() == 5
    assert await consumer.refresh_lag(js) == (5, 0)
    assert gauge("subsidy_consumer_pending_messages", consumer=consumer.name) == 5
    msgs = await sub.fetch(2, timeout=5)  # delivered, not yet acknowledged
    assert await consumer.refresh_lag(js) == (3, 2)
    assert gauge("subsidy_consumer_ack_pending_messages", consumer=consumer.name) == 2
    for msg in msgs:
        await consumer.handle(store, js, msg)
    for _ in range(50):  # an ack is a publish: the server counts it a moment later
        if await consumer.refresh_lag(js) == (3, 0):
            break
        await asyncio.sleep(0.05)
    assert await consumer.refresh_lag(js) == (3, 0)

    # The background loop keeps them fresh without the consumer's own loop running.
    stop = asyncio.Event()
    relay = bus.OutboxRelay(store, js)
    before = time.time()
    task = asyncio.create_task(keep_lag_metrics(stop, relay, [consumer], js, every_s=0.1))
    try:
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (gauge("subsidy_lag_refreshed_timestamp_seconds") or 0) >= before:
                break
        assert (gauge("subsidy_lag_refreshed_timestamp_seconds") or 0) >= before
        assert gauge("subsidy_consumer_pending_messages", consumer=consumer.name) == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await sub.unsubscribe()
