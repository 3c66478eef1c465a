"""JetStream as a three-node cluster on loopback, the streams at three replicas, as production
runs it: a node killed (SIGKILL) in the middle of checkouts loses no event and stops nothing,
and it catches up when it comes back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import nats.errors
import pytest
from nats.js.api import StreamInfo

from services.kernel import bus, natsauth
from subsidy.v1 import audit_pb2, eligibility_pb2, ledger_pb2
from subsidyctl.stack import free_port
from subsidyctl.stack.nats import NatsCluster
from tests.conftest import Infra
from tests.e2e.conftest import Platform, eventually, platform_on
from tests.e2e.test_funding_sources import PHONE_PRICE, checkout


@pytest.fixture(scope="module")
async def clustered(infra: Infra) -> AsyncIterator[tuple[NatsCluster, Platform]]:
    root = infra.root / f"nats-cluster-{free_port()}"
    cluster = NatsCluster(
        store_dir=root, log_dir=root / "logs", accounts=natsauth.provision(infra.bao.client())
    )
    cluster.start()
    try:
        async with platform_on(infra, cluster.url, cluster.operator) as p:
            yield cluster, p
    finally:
        cluster.stop()


async def streams(cluster: NatsCluster) -> dict[str, StreamInfo]:
    nc, js = await bus.connect(cluster.url, "test-cluster", cluster.operator)
    try:
        return {name: await js.stream_info(name) for name in (bus.EVENTS_STREAM, bus.DLQ_STREAM)}
    finally:
        await nc.close()


async def shop(p: Platform, pool: str, sku: str, count: int) -> list[tuple[str, str]]:
    """``count`` checkouts, each reserved then captured: (order, qualification)."""
    done = []
    for _ in range(count):
        order, qualification = await checkout(p, pool, sku, "phone", PHONE_PRICE)
        await p.ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(
                order_id=order, payment_ref=f"pay-{order}", paid_amount_fen=PHONE_PRICE - 45_000
            )
        )
        done.append((order, qualification))
    return done


async def every_event_logged_once(p: Platform) -> None:
    """The audit log holds exactly the events every store holds, no more, no fewer (checked
    until it does: a consumer's event may append another after ``quiesce`` read the stores)."""
    info = await p.audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
    for name, r in p.running.items():
        assert info.entries_by_service[name] == await r.runtime.store.count(), name


async def test_every_stream_is_replicated_on_all_three_nodes(
    clustered: tuple[NatsCluster, Platform],
) -> None:
    cluster, _ = clustered
    for name, info in (await streams(cluster)).items():
        assert info.config.num_replicas == 3, name
        assert info.cluster is not None and info.cluster.leader
        assert len(info.cluster.replicas or []) == 2, name  # besides the leader


async def test_a_node_killed_during_checkouts_loses_no_event(
    clustered: tuple[NatsCluster, Platform], rng: random.Random
) -> None:
    cluster, p = clustered
    pool = await p.pool(rng, 10_000_000)
    phone = await p.product(rng, "phone", 0, PHONE_PRICE)
    leader = (await streams(cluster))[bus.EVENTS_STREAM].cluster
    assert leader is not None
    # The events stream's leader is the hardest node to lose: kill that one.
    victim = next(n for n in cluster.nodes if n.route and n.route.server_name == leader.leader)
    traffic = asyncio.create_task(shop(p, pool, phone, 10))
    await asyncio.sleep(1.0)
    victim.kill()
    before = await traffic  # every checkout answered, through the loss
    after = await shop(p, pool, phone, 3)  # and the platform goes on with two nodes
    # With the node still down, every event is published, consumed and logged (with one
    # replica, the stream would be gone with its node until it came back).
    await p.quiesce(within=90)
    await eventually(lambda: every_event_logged_once(p), within=60)
    budget = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert budget.spent_fen == 45_000 * len(before + after)
    for _, qualification in before + after:  # eligibility saw every capture

        async def used(q: str = qualification) -> None:
            got = await p.eligibility.GetQualification(
                eligibility_pb2.GetQualificationRequest(qualification_id=q)
            )
            assert got.status == "USED"

        await eventually(used, within=30)
    victim.start()  # back on its store: it catches up with the others

    async def caught_up() -> None:
        try:
            info = (await streams(cluster))[bus.EVENTS_STREAM]
        except nats.errors.TimeoutError:  # the restarted node rejoining: no answer yet
            raise AssertionError("the cluster did not answer STREAM.INFO yet") from None
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        assert all(r.current for r in info.cluster.replicas or []), info.cluster

    await eventually(caught_up, within=30)
    await shop(p, pool, phone, 1)
    await p.quiesce(within=60)
    await eventually(lambda: every_event_logged_once(p), within=60)
    info = (await streams(cluster))[bus.EVENTS_STREAM]
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    assert all(r.current for r in info.cluster.replicas or []), "the node caught up"
