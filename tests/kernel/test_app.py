"""The service lifecycle (services.kernel.app) on the real PostgreSQL, NATS and OpenBao."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js import JetStreamContext
from sqlalchemy import MetaData

from services.kernel import app, natsauth, rpc
from services.kernel.consumer import EventConsumer
from services.kernel.events import Envelope
from services.kernel.eventstore import Tx
from services.kernel.settings import Settings
from tests.conftest import Infra
from tests.support.callers import OPERATOR

SERVICE_NAME = "test.v1.Nothing"


class CannotSubscribe(EventConsumer):
    """A consumer whose subscription fails (as with a consumer config the server refuses)."""

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        raise RuntimeError("the server refused the consumer")


async def ignore(tx: Tx, env: Envelope) -> None:
    return None


def spec_with(consumer: EventConsumer) -> app.ServiceSpec:
    async def build(rt: app.Runtime) -> app.Wiring:
        return app.Wiring(registrations=[], service_names=[SERVICE_NAME], consumers=[consumer])

    return app.ServiceSpec(name="lifecycle", metadata=MetaData(), build=build)


def settings(infra: Infra) -> Settings:
    return Settings(
        service="lifecycle",
        grpc_listen="127.0.0.1:0",
        database_url=infra.create_kernel_database("app"),
        nats_url=infra.nats.url,
        nats_nkey_path=natsauth.kv_path(natsauth.OPERATOR),  # not a platform service
        vault_addr=infra.bao.addr,
        vault_token=infra.bao.token,
        vault_k8s_role=None,
        tls_source="vault",
    )


async def health_of(infra: Infra, port: int) -> dict[str, int]:
    async with rpc.channel(f"127.0.0.1:{port}", infra.identities(OPERATOR)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {
            name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", SERVICE_NAME)
        }


async def test_a_consumer_that_ends_turns_health_not_serving_and_stop_still_cleans_up(
    infra: Infra,
) -> None:
    running = await app.start(
        spec_with(CannotSubscribe("broken", ["events.x.>"], ignore)), settings(infra)
    )
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for _ in range(100):
        if await health_of(infra, running.port) == {"": not_serving, SERVICE_NAME: not_serving}:
            break
        await asyncio.sleep(0.05)
    assert await health_of(infra, running.port) == {"": not_serving, SERVICE_NAME: not_serving}
    # Stopping does not re-raise the dead consumer's error, and finishes every step.
    await asyncio.wait_for(running.stop(), 30)
    assert running.runtime.nc.is_closed


async def test_a_healthy_service_serves_until_stopped(infra: Infra) -> None:
    running = await app.start(
        spec_with(EventConsumer("fine", ["events.y.>"], ignore)), settings(infra)
    )
    await asyncio.sleep(0.5)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_of(infra, running.port) == {"": serving, SERVICE_NAME: serving}
    await asyncio.wait_for(running.stop(), 30)
    assert running.runtime.nc.is_closed


# settle_heap in a process of its own: the test session's collector is left as it is.
SETTLE_HEAP = """
import gc, json, weakref
from services.kernel import app

before = gc.get_freeze_count()
app.settle_heap()
frozen = gc.get_freeze_count()


class Node:
    pass


a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze: garbage once dropped
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps([before, frozen, gc.get_threshold(), gone() is None]))
"""


def test_a_serving_process_freezes_its_startup_heap_and_still_collects_later_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SETTLE_HEAP],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    before, frozen, threshold, collected = json.loads(out.stdout)
    assert before == 0
    assert frozen > 10_000  # the modules it imported, out of the collector's sight
    assert threshold == [app.GC_YOUNG_THRESHOLD, 10, 10]
    assert collected  # what is made and dropped afterwards is still collected
