"""Chaos: kill -9 the ledger, eligibility and audit mid-traffic; every invariant still holds.

The separate-process stack `make run` starts (real PostgreSQL, NATS, OpenBao), checkouts driven
as a platform drives them (retrying UNAVAILABLE with the same order id, as the integration guide
says), while a chaos task kills services with SIGKILL and restarts them. Afterwards every
invariant is checked from the databases and the audit log, with the functions of
services/invariants.py: budgets (rebuilt from the audit log alone), audit completeness,
per-person limits, daily quotas, no qualification locked without a hold, and every checkout
the platform saw succeed captured and its qualification used.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import psycopg
import pytest

from services.eligibility.handlers import check_limits
from services.kernel import rpc
from services.kernel.contract.policy import default_policy
from services.kernel.eventstore import make_engine
from subsidy.v1 import eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.cli.audit import verify
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import LocalStack, Ports, free_base, wait_until_audited

T = TypeVar("T")
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}


RETRIES: list[str] = []  # every transient failure the "platform" met (proof the chaos hit it)


async def retrying(call: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """What a platform does: retry a transient failure of an idempotent call, same request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in TRANSIENT or loop.time() > deadline:
                raise
            RETRIES.append(err.code().name)
            await asyncio.sleep(0.2)


@pytest.mark.slow
def test_checkouts_survive_kill_minus_nine_of_every_stateful_service(tmp_path: Path) -> None:
    stack = LocalStack(
        tmp_path / "run",
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
        settings_overrides={"SUBSIDY_ABANDON_AFTER_S": "3"},
    )
    stack.start()
    try:
        outcome = asyncio.run(_run(stack))
    finally:
        stack.stop()
    done, refused = outcome
    print(f"chaos: {done} completed, {refused} refused, {len(RETRIES)} transient failures retried")
    assert done >= 10, f"only {done} checkouts completed"  # the traffic really flowed
    assert done + refused <= 400


async def _run(stack: LocalStack) -> tuple[int, int]:
    client = demo.Client(stack.endpoints())
    rng = random.Random(11)
    try:
        await demo.seed(client, rng, {**demo.load_demo(), "consumers": 0})
        completed: list[tuple[str, str]] = []  # (order id, qualification id)
        refused: list[str] = []
        linked: list[int] = []  # claims refused because a linked consumer had claimed

        async def checkout(i: int) -> None:
            person = demo.generate_person(rng)
            # Consumers 2k and 2k+1 share a device: one person, one phone between them.
            shared = eligibility_pb2.Identifiers(device_id=f"chaos-device-{i // 2}")
            consumer = await retrying(lambda: demo.register(client, person, shared))
            try:
                qual = await retrying(
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
                # The device's other consumer has the phone, or a retried claim whose first
                # try had landed.
                info = rpc.error_info(err)
                refused.append(f"claim-{i}")
                if info is not None and info.reason == "PERSON_LIMIT_REACHED":
                    linked.append(i)
                return
            order = f"chaos-{i}"
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
                await retrying(lambda: client.ledger.ReserveSubsidy(request))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                refused.append(order)  # e.g. ORDER_REFUSED: its attempt was swept after a crash
                return
            await retrying(
                lambda: client.ledger.CaptureSubsidy(
                    ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref=f"pay-{i}")
                )
            )
            completed.append((order, qual.qualification_id))

        traffic_running = True
        chaos_done = False
        kills_during_traffic: list[str] = []
        started = 0

        async def traffic() -> None:
            """At least 60 checkouts, and on until the chaos is over (at most 400)."""
            nonlocal traffic_running, started

            async def worker() -> None:
                nonlocal started
                while (started < 60 or not chaos_done) and started < 400:
                    started += 1
                    await checkout(started)

            await asyncio.gather(*(worker() for _ in range(3)))
            traffic_running = False

        async def chaos() -> None:
            nonlocal chaos_done
            for service in ("audit", "eligibility", "ledger"):
                await asyncio.sleep(0.6)
                await asyncio.to_thread(stack.kill, service)
                if traffic_running:
                    kills_during_traffic.append(service)
                await asyncio.sleep(0.3)
                await asyncio.to_thread(stack.respawn, service)
            chaos_done = True

        await asyncio.gather(traffic(), chaos())
        assert kills_during_traffic == ["audit", "eligibility", "ledger"]
        assert RETRIES, "no call ever met a dead service: the chaos did not hit the traffic"
        assert linked, "no claim met a linked consumer's: the per-person limit was not exercised"

        # -- every invariant, from the databases and the audit log -------------------------
        await wait_until_audited(stack, client, within=60)
        report = await verify(client.audit, client.ledger, client.event_logs)  # and the stores
        assert report["ok"]
        assert report["pools"]["pingshan-2025"]["spent_fen"] == 45_000 * len(completed)
        assert stack.pg is not None
        policy = default_policy()

        pg = stack.pg
        eligibility_db = make_engine(pg.url("eligibility"), pool_size=1)

        def settled() -> None:
            with (
                psycopg.connect(pg.conninfo("eligibility")) as e_db,
                psycopg.connect(pg.conninfo("ledger")) as l_db,
            ):
                pending = {
                    r[0]
                    for r in l_db.execute(
                        "SELECT order_id FROM reservations WHERE status = 'PENDING'"
                    )
                }
                assert pending == set()  # every hold was captured (the platform retried)
                locked = e_db.execute(
                    "SELECT order_id FROM qualifications WHERE status = 'LOCKED'"
                ).fetchall()
                assert locked == [], f"locked without a hold: {locked}"
                used = {
                    r[0]: r[1]
                    for r in e_db.execute(
                        "SELECT order_id, qualification_id FROM qualifications"
                        " WHERE status = 'USED'"
                    )
                }
                assert used == dict(completed)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        try:
            while True:  # swept attempts and redelivered events settle within seconds
                try:
                    await asyncio.to_thread(settled)
                    await check_limits(eligibility_db, policy)  # the service's own check
                    break
                except AssertionError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await eligibility_db.dispose()
        return len(completed), len(refused)
    finally:
        await client.close()
