"""No input can wedge the outbox: an event larger than the bus accepts is refused at append, and
a relay that still meets one stops serving and moves on only by an operator's recorded skip.

The review wedged the ledger's outbox with one 1.5 MB field: the event committed, NATS refused
it, and the relay retried it forever while health said SERVING.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import text

from services.kernel import app, bus, metrics, rpc
from services.kernel.consumer import EventConsumer
from services.kernel.events import (
    MAX_ENVELOPE_BYTES,
    Context,
    EventTooLarge,
    new_envelope,
    service_actor,
)
from services.kernel.eventstore import EventStore
from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import outbox_pb2, outbox_pb2_grpc
from tests.conftest import Infra
from tests.e2e.conftest import status_of
from tests.kernel.test_app import SERVICE_NAME, health_of, ignore, settings, spec_with
from tests.support.callers import OPERATOR

CTX = Context(service_actor("lifecycle"))


def funding(service: str, source: str) -> ev.BudgetFunded:
    return ev.BudgetFunded(pool_id=f"p-{uuid.uuid4().hex[:8]}", amount_fen=1, source=source)


async def test_an_event_the_bus_would_refuse_is_refused_at_append(store: EventStore) -> None:
    huge = new_envelope("lifecycle", "s/1", funding("lifecycle", "x" * MAX_ENVELOPE_BYTES), CTX)
    fine = new_envelope("lifecycle", "s/1", funding("lifecycle", "district"), CTX)
    with pytest.raises(EventTooLarge) as err:
        async with store.transaction() as tx:
            await tx.append("s/1", 0, [fine, huge])
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "EVENT_TOO_LARGE",
    )
    assert await store.count() == 0  # nothing committed, not even the fine one


async def published(js: object, subject: str) -> list[str]:
    sub = await js.subscribe(  # type: ignore[attr-defined]
        subject, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    ids: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                return ids
            ids.append(ev.EventEnvelope.FromString(msg.data).event_id)
    finally:
        await sub.unsubscribe()


async def test_a_stuck_relay_stops_serving_until_an_operator_skips_the_event(
    infra: Infra,
) -> None:
    running = await app.start(
        spec_with(EventConsumer("wedge", ["events.z.>"], ignore)), settings(infra)
    )
    store = running.runtime.store
    try:
        # An oversized event that reached the table before the bound (written past append).
        stuck = new_envelope("lifecycle", "s/old", funding("lifecycle", "y" * 1_200_000), CTX)
        stuck.stream_version = 1
        async with store.transaction() as tx:
            await tx.conn.execute(
                text(
                    "INSERT INTO events (event_id, stream_id, stream_version, event_type, envelope)"
                    " VALUES (:e, 's/old', 1, :t, :b)"
                ),
                {"e": stuck.event_id, "t": stuck.event_type, "b": stuck.SerializeToString()},
            )
        later = new_envelope("lifecycle", "s/new", funding("lifecycle", "district"), CTX)
        await store.append("s/new", 0, [later])
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(100):
            if (await health_of(infra, running.port))[SERVICE_NAME] == not_serving:
                break
            await asyncio.sleep(0.1)
        assert await health_of(infra, running.port) == {"": not_serving, SERVICE_NAME: not_serving}
        assert metrics.UNPUBLISHABLE.labels(stuck.event_id)._value.get() == 1
        ids = await published(running.runtime.js, "events.lifecycle.>")
        assert later.event_id not in ids  # held behind the stuck one: nothing overtakes it

        async with rpc.channel(f"127.0.0.1:{running.port}", infra.identities(OPERATOR)) as ch:
            outbox = outbox_pb2_grpc.OutboxServiceStub(ch)
            status = await outbox.GetOutboxStatus(outbox_pb2.GetOutboxStatusRequest())
            assert (status.stuck_event_id, status.stuck_reason) == (
                stuck.event_id,
                "MaxPayloadError",
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:  # only that event, with a reason
                await outbox.SkipStuckEvent(
                    outbox_pb2.SkipStuckEventRequest(event_id=later.event_id, reason="no")
                )
            assert status_of(err.value) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "NOT_THE_STUCK_EVENT",
                "event_id",
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await outbox.SkipStuckEvent(
                    outbox_pb2.SkipStuckEventRequest(event_id=stuck.event_id, reason=" ")
                )
            assert status_of(err.value) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "MISSING_FIELD",
                "reason",
            )
            await outbox.SkipStuckEvent(
                outbox_pb2.SkipStuckEventRequest(
                    event_id=stuck.event_id, reason="oversized, from before the bound"
                )
            )
        serving = health_pb2.HealthCheckResponse.SERVING
        for _ in range(100):
            if (await health_of(infra, running.port))[SERVICE_NAME] == serving:
                break
            await asyncio.sleep(0.1)
        assert await health_of(infra, running.port) == {"": serving, SERVICE_NAME: serving}
        for _ in range(50):
            ids = await published(running.runtime.js, "events.lifecycle.>")
            if later.event_id in ids:
                break
        assert later.event_id in ids and stuck.event_id not in ids
        skips = await store.read_stream(bus.SKIPS_STREAM)
        [skipped] = [ev.OutboxEventSkipped.FromString(e.payload) for e in skips]
        assert skipped.event_id == stuck.event_id
        assert skips[0].actor.id == OPERATOR.name  # who let it past is on the record
        assert skips[0].event_id in ids  # and the skip itself reached the bus (and the auditors)
    finally:
        await asyncio.wait_for(running.stop(), 30)
