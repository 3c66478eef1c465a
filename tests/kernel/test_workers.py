"""Several workers of one service (services/kernel/workers.py): they share one port, and the work
that must be singular (the outbox relay, sweepers, detection) runs in one process at a time,
decided by a PostgreSQL advisory lock, with a takeover when the leader goes."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from nats.aio.msg import Msg
from sqlalchemy import MetaData, text

from services.kernel import app, bus
from services.kernel.consumer import decode
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import make_engine
from services.kernel.settings import SettingsError
from services.kernel.workers import Leadership, lock_key, worker_command
from subsidy.v1 import events_pb2 as ev
from subsidyctl.stack import free_port
from tests.conftest import Infra
from tests.kernel.test_app import SERVICE_NAME, health_of, settings

CTX = Context(service_actor("lifecycle"))


def funding() -> ev.BudgetFunded:
    return ev.BudgetFunded(pool_id=f"p-{uuid.uuid4().hex[:8]}", amount_fen=1, source="district")


class Runners:
    """Which contenders are inside the singular loop right now, and the most ever at once."""

    def __init__(self) -> None:
        self.inside: set[str] = set()
        self.most = 0
        self.ran: list[str] = []

    def loop(self, who: str) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
        async def singular(until: asyncio.Event) -> None:
            self.inside.add(who)
            self.most = max(self.most, len(self.inside))
            self.ran.append(who)
            try:
                await until.wait()
            finally:
                self.inside.discard(who)

        return singular


async def wait_for(condition: Callable[[], bool], within_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_lock_keys_are_stable_signed_64_bit_and_per_name() -> None:
    assert lock_key("ledger-singular") == lock_key("ledger-singular")
    assert lock_key("ledger-singular") != lock_key("audit-singular")
    assert -(2**63) <= lock_key("ledger-singular") < 2**63
    assert worker_command("ledger", 1)[-4:] == ["services.ledger", "serve", "--worker", "1"]


async def test_one_leader_at_a_time_and_a_takeover_when_it_stops_or_its_session_dies(
    infra: Infra,
) -> None:
    url = infra.create_kernel_database("lead")
    engines = [make_engine(url, pool_size=2) for _ in range(3)]
    runners = Runners()
    stops = [asyncio.Event() for _ in engines]
    leaders = [
        Leadership(e, "svc-singular", [runners.loop(f"w{i}")], retry_s=0.1, check_s=0.1)
        for i, e in enumerate(engines)
    ]
    tasks = [asyncio.create_task(lead.run(stop)) for lead, stop in zip(leaders, stops, strict=True)]
    try:
        await wait_for(lambda: len(runners.inside) == 1)
        await asyncio.sleep(1.0)  # the others keep contending meanwhile, and fail
        assert runners.most == 1 and len(runners.ran) == 1
        first = int(runners.ran[0][1:])
        assert [lead.leading for lead in leaders].count(True) == 1 and leaders[first].leading

        # The leader stops (a worker drained): another takes over.
        stops[first].set()
        await tasks[first]
        await wait_for(lambda: len(runners.ran) == 2 and len(runners.inside) == 1)
        second = int(runners.ran[1][1:])
        assert second != first and not leaders[first].leading

        # The leader's database session dies (the process hangs, the server kills it): it
        # steps down, and exactly one runs again.
        async with engines[first].connect() as conn:
            killed = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND granted AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            )
            assert killed.scalars().all() == [True]  # one session holds it: the leader's
        await wait_for(lambda: len(runners.ran) == 3 and len(runners.inside) == 1)
        assert runners.most == 1  # never two at once, through both handovers
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for e in engines:
            await e.dispose()
    assert not runners.inside


async def test_two_workers_share_one_port_and_run_the_singular_loops_once(infra: Infra) -> None:
    runners = Runners()
    port = free_port()
    base = dataclasses.replace(settings(infra), grpc_listen=f"127.0.0.1:{port}", workers=2)

    def spec(who: str) -> app.ServiceSpec:
        async def build(rt: app.Runtime) -> app.Wiring:
            return app.Wiring(
                registrations=[], service_names=[SERVICE_NAME], singular=[runners.loop(who)]
            )

        return app.ServiceSpec(name="lifecycle", metadata=MetaData(), build=build)

    workers = [await app.start(spec(f"w{i}"), base) for i in range(2)]
    try:
        assert [w.port for w in workers] == [port, port]  # SO_REUSEPORT: both bound
        serving = health_pb2.HealthCheckResponse.SERVING
        for _ in range(10):  # new connections land on either: every one is answered
            assert await health_of(infra, port) == {"": serving, SERVICE_NAME: serving}
        await wait_for(lambda: len(runners.inside) == 1)
        # Events either worker appends are published by one relay, once each: every one of
        # them goes over the bus once, not twice. Counted off the bus itself, by event id (the
        # process's published counter also moves with other tests' services still running).
        published: Counter[str] = Counter()
        ours: set[str] = set()

        async def heard(msg: Msg) -> None:
            env = decode(msg.data)
            if env is not None and env.stream_id in ours:
                published[env.event_id] += 1

        nc, _ = await bus.connect(infra.nats.url, "test", infra.nats_credentials())
        try:
            await nc.subscribe("events.lifecycle.>", cb=heard)
            await nc.flush()
            appended: list[str] = []
            for i, w in enumerate(workers):
                stream = f"s/{uuid.uuid4().hex[:8]}"
                ours.add(stream)
                envs = [new_envelope("lifecycle", stream, funding(), CTX) for _ in range(3 + i)]
                appended += [env.event_id for env in envs]
                await w.runtime.store.append(stream, 0, envs)
            await wait_for(lambda: published.total() >= 7)
            await asyncio.sleep(1.5)  # a second relay, were there one, would publish them again
        finally:
            await nc.close()
        assert published == Counter(appended), published
        assert runners.most == 1 and len(runners.ran) == 1
        leader = int(runners.ran[0][1:])
        await asyncio.wait_for(workers[leader].stop(), 30)
        # The remaining worker takes the relay and the loops over.
        await wait_for(lambda: len(runners.ran) == 2 and len(runners.inside) == 1)
        assert runners.ran[1] != runners.ran[0] and runners.most == 1
        assert await health_of(infra, port) == {"": serving, SERVICE_NAME: serving}
    finally:
        for w in workers:
            if not w.done.done():
                await asyncio.wait_for(w.stop(), 30)


async def test_one_worker_alone_may_not_share_its_port(infra: Infra) -> None:
    """Without SUBSIDY_WORKERS the port stays exclusive: a second process on it fails."""
    port = free_port()
    one = dataclasses.replace(settings(infra), grpc_listen=f"127.0.0.1:{port}")

    async def build(rt: app.Runtime) -> app.Wiring:
        return app.Wiring(registrations=[], service_names=[SERVICE_NAME])

    spec = app.ServiceSpec(name="lifecycle", metadata=MetaData(), build=build)
    first = await app.start(spec, one)
    try:
        with pytest.raises((SettingsError, RuntimeError)):
            await app.start(spec, one)
    finally:
        await asyncio.wait_for(first.stop(), 30)
