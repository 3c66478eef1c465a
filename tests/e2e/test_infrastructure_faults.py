"""PostgreSQL, NATS and OpenBao killed, PostgreSQL down for 30 s, under a checkout load: nothing
lost, nothing dead-lettered, no service restarted.

The separate-process stack `make run` starts (real PostgreSQL, NATS, OpenBao), checkouts driven
as a platform drives them (retrying UNAVAILABLE with the same order id, as the integration guide
says). Twice, mid-traffic:
- kill -9 of the postmaster: the stack's supervisor reaps it and starts it again on the same
  data (a log line says so), and the services reconnect by themselves;
- PostgreSQL stopped for 30 s and started again: every service turns NOT_SERVING meanwhile and
  SERVING after, and no event in flight is dead-lettered (the consumers' default limit of 5
  deliveries would have been spent within seconds had the outage counted);
- (a second run) kill -9 of nats-server, then of OpenBao: each restarted by the supervisor (on
  its data: JetStream's file store, OpenBao's raft storage, unsealed again), the services'
  clients reconnect.
Afterwards no service process was restarted, the dead-letter stream is empty, every checkout the
platform saw succeed is captured and its qualification used, and every invariant and
`subsidyctl audit verify` pass.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.eligibility.handlers import check_limits
from services.kernel import bus, rpc
from services.kernel.contract.policy import default_policy
from services.kernel.eventstore import make_engine
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.cli.audit import verify
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import SERVICES, LocalStack, Ports, free_base, wait_until_audited
from subsidyctl.stack import Nats

T = TypeVar("T")
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
OUTAGE_S = 30.0


class Platform:
    """What a platform does: retry a transient failure of an idempotent call, same request."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}

    async def call(self, call: Callable[[], Awaitable[T]], within: float = 120.0) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if err.code() not in TRANSIENT or loop.time() > deadline:
                    raise
                self.retries[err.code().name] = self.retries.get(err.code().name, 0) + 1
                await asyncio.sleep(0.3)


def health(stack: LocalStack, service: str) -> int:
    with grpc.secure_channel(stack.endpoint(service), stack.probe_credentials()) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {within:.0f} s")
        await asyncio.sleep(0.2)


def all_serving(stack: LocalStack) -> bool:
    return all(health(stack, s) == health_pb2.HealthCheckResponse.SERVING for s in SERVICES)


def none_serving(stack: LocalStack) -> bool:
    return all(health(stack, s) != health_pb2.HealthCheckResponse.SERVING for s in SERVICES)


Injection = Callable[[LocalStack, io.StringIO, Callable[[], int]], Awaitable[None]]


def more_than(count: Callable[[], int], n: int) -> bool:
    return count() > n


async def kill_and_restart(stack: LocalStack, log: io.StringIO, part: str, pid: int | None) -> None:
    """kill -9 of one infrastructure process; the supervisor reaps it and starts it again."""
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: f"{part} restarted" in log.getvalue(), 60, f"{part} restarted")
    assert f"{part} exited (code -9); restarting it" in log.getvalue()
    # reaped: no zombie left behind
    assert not await asyncio.to_thread(os.path.exists, f"/proc/{pid}")
    await until(lambda: all_serving(stack), 30, f"serving after {part} restarted")


async def postgres_faults(
    stack: LocalStack, log: io.StringIO, completed: Callable[[], int]
) -> None:
    """kill -9 of the postmaster, then PostgreSQL stopped for 30 s."""
    pg = stack.pg
    assert pg is not None
    before = completed()
    killed = pg.pid
    await kill_and_restart(stack, log, "PostgreSQL", killed)
    assert pg.pid != killed
    await until(lambda: completed() > before + 3, 60, "checking out again")
    # PostgreSQL down for 30 s (stopped on purpose: the supervisor leaves it).
    before = completed()
    await asyncio.to_thread(pg.stop)
    await until(lambda: none_serving(stack), 15, "NOT_SERVING during the outage")
    await asyncio.sleep(OUTAGE_S)
    await asyncio.to_thread(pg.start)
    await until(lambda: all_serving(stack), 30, "serving after the outage")
    await until(lambda: completed() > before + 3, 90, "checking out again")


async def nats_and_openbao_faults(
    stack: LocalStack, log: io.StringIO, completed: Callable[[], int]
) -> None:
    """kill -9 of nats-server, then of OpenBao."""
    assert isinstance(stack.nats, Nats) and stack.bao is not None  # one node: `make run`'s
    for part, server in (("NATS", stack.nats), ("OpenBao", stack.bao)):
        before = completed()
        await kill_and_restart(stack, log, part, server.pid)
        await until(functools.partial(more_than, completed, before + 3), 60, f"after {part}")


@pytest.mark.slow
@pytest.mark.parametrize("inject", [postgres_faults, nats_and_openbao_faults])
def test_infrastructure_killed_under_checkouts_loses_nothing(
    tmp_path: Path, inject: Injection
) -> None:
    log = io.StringIO()
    stack = LocalStack(
        tmp_path / "run",
        Ports(free_base()),
        # As `make run` does: a commit PostgreSQL acknowledged survives its kill -9 (the
        # tests' durable=False commits asynchronously, which a killed postmaster may lose).
        durable=True,
        log=log,
        settings_overrides={"SUBSIDY_ABANDON_AFTER_S": "3"},
    )
    stack.start()
    try:
        pids = {s: stack.pid(s) for s in SERVICES}
        done, refused, retries = asyncio.run(_run(stack, log, inject))
        assert stack.dead() == [] and {s: stack.pid(s) for s in SERVICES} == pids  # no restart
    finally:
        stack.stop()
    print(f"faults: {done} completed, {refused} refused, retries {retries}")
    assert done >= 10, f"only {done} checkouts completed"  # the traffic really flowed


async def _run(
    stack: LocalStack, log: io.StringIO, inject: Injection
) -> tuple[int, int, dict[str, int]]:
    assert stack.pg is not None and stack.nats is not None
    client = demo.Client(stack.endpoints())
    platform = Platform()
    rng = random.Random(15)
    try:
        await demo.seed(client, rng, {**demo.load_demo(), "consumers": 0})
        completed: list[tuple[str, str]] = []  # (order id, qualification id)
        refused: list[str] = []

        async def checkout(i: int) -> None:
            person = demo.generate_person(rng)
            consumer = await platform.call(lambda: demo.register(client, person))
            try:
                qual = await platform.call(
                    lambda: client.eligibility.ClaimQualification(
                        eligibility_pb2.ClaimQualificationRequest(
                            circumstances=IN_REGION,
                            consumer_id=consumer.consumer_id,
                            category="phone",
                            channel=client.platform_id,
                        )
                    )
                )
            except grpc.aio.AioRpcError as err:
                # A retried claim whose first try had landed before the outage answered.
                info = rpc.error_info(err)
                assert info is not None and info.reason == "PERSON_LIMIT_REACHED", err
                refused.append(f"claim-{i}")
                return
            order = f"faults-{i}"
            request = ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id=client.platform_id,
                pool_id="pingshan-2025",
                consumer_id=consumer.consumer_id,
                qualification_id=qual.qualification_id,
                sku="demo-phone",
                unit_price_fen=300_000,
            )
            try:
                await platform.call(lambda: client.ledger.ReserveSubsidy(request))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                refused.append(order)  # its attempt was swept while the database was away
                return
            await platform.call(
                lambda: client.ledger.CaptureSubsidy(
                    ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=f"pay-{i}")
                )
            )
            completed.append((order, qual.qualification_id))

        faults_done = False
        started = 0

        async def traffic() -> None:
            async def worker() -> None:
                nonlocal started
                while not faults_done and started < 600:
                    started += 1
                    await checkout(started)

            await asyncio.gather(*(worker() for _ in range(3)))

        async def faults() -> None:
            nonlocal faults_done
            await asyncio.sleep(2.0)
            await inject(stack, log, lambda: len(completed))
            faults_done = True

        await asyncio.gather(traffic(), faults())
        if inject is postgres_faults:
            assert platform.retries.get("UNAVAILABLE", 0) > 0, "no call ever met the outage"

        # -- nothing dead-lettered, every invariant, from the databases and the audit log ------
        nc, js = await bus.connect(stack.nats.url, "test", stack.nats.operator)
        try:
            dead = (await js.stream_info(bus.DLQ_STREAM)).state.messages
        finally:
            await nc.close()
        assert dead == 0, f"{dead} events were dead-lettered"
        await wait_until_audited(stack, client, within=90)
        report = await verify(client.audit, client.ledger, client.event_logs)
        assert report["ok"]
        assert report["pools"]["pingshan-2025"]["spent_fen"] == 45_000 * len(completed)
        pg = stack.pg
        eligibility_db = make_engine(pg.url("eligibility"), pool_size=1)

        def settled() -> None:
            with (
                psycopg.connect(pg.conninfo("eligibility")) as e_db,
                psycopg.connect(pg.conninfo("ledger")) as l_db,
            ):
                pending = l_db.execute(
                    "SELECT order_id FROM reservations WHERE status = 'PENDING'"
                ).fetchall()
                assert pending == []  # every hold was captured (the platform retried)
                captured = {
                    r[0]
                    for r in l_db.execute(
                        "SELECT order_id FROM reservations WHERE status = 'CAPTURED'"
                    )
                }
                assert {o for o, _ in completed} <= captured  # every acknowledged capture
                locked = e_db.execute(
                    "SELECT order_id FROM qualifications WHERE status = 'LOCKED'"
                ).fetchall()
                assert locked == [], f"locked without a hold: {locked}"
                used: dict[str, str] = dict(
                    e_db.execute(
                        "SELECT order_id, qualification_id FROM qualifications"
                        " WHERE status = 'USED'"
                    ).fetchall()
                )
                assert used == dict(completed)

        deadline = time.monotonic() + 60
        try:
            while True:
                try:
                    await asyncio.to_thread(settled)
                    await check_limits(eligibility_db, default_policy())
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await eligibility_db.dispose()
        return len(completed), len(refused), platform.retries
    finally:
        await client.close()
