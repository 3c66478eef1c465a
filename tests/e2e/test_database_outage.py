"""A database outage answers UNAVAILABLE with a retry delay, and health says so, on every service.

The four services run in this process against their own real PostgreSQL (not the session's,
which every other test shares), which is stopped through the local stack's code and started
again. While it is down, the calls the issue found answering INTERNAL (RegisterConsumer,
ClaimQualification, ReserveSubsidy, CaptureSubsidy, GetBudget, GetLogInfo, and a catalog
read) answer UNAVAILABLE with ``ErrorInfo{reason: ..._UNAVAILABLE}`` and a
``google.rpc.RetryInfo``, every service's health is NOT_SERVING, and nothing is logged as an
unhandled error. Once it is back, every service is SERVING again without a restart and the
same calls are answered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kernel import natsauth, rpc
from subsidy.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    eligibility_pb2,
    eligibility_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)
from subsidyctl.demo import IN_REGION, write_demo_policy
from subsidyctl.inprocess import InProcessPlatform, start_platform
from subsidyctl.stack import Nats, Postgres, free_port
from tests.conftest import Infra
from tests.support.callers import OPERATOR, CallerRouter
from tests.support.identities import make_person

SERVICES = ("catalog", "eligibility", "ledger", "audit")


@dataclass
class Stack:
    pg: Postgres
    platform: InProcessPlatform
    channels: dict[str, CallerRouter]


@pytest.fixture
async def stack(infra: Infra, tmp_path: Path) -> AsyncIterator[Stack]:
    logs = tmp_path / "logs"
    pg = Postgres(data_dir=tmp_path / "pg", port=free_port(), log_dir=logs, durable=False)
    nats = Nats(
        store_dir=tmp_path / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=logs,
        accounts=natsauth.provision(infra.bao.client()),
    )
    pg.start()
    nats.start()
    databases = {s: pg.service_database(s) for s in SERVICES}
    identities = infra.identities
    platform = await start_platform(
        lambda name: databases[name].runtime_url,
        nats.url,
        infra.bao.addr,
        infra.bao.token,
        migration_database_url=lambda name: databases[name].migration_url,
        initial_policy=write_demo_policy(tmp_path),
        expiry_sweep_s=1.0,  # a background loop that meets the outage too
    )
    channels = {n: CallerRouter(a, identities) for n, a in platform.endpoints.items()}
    try:
        yield Stack(pg, platform, channels)
    finally:
        for ch in channels.values():
            await ch.close()
        await platform.stop()
        nats.stop()
        pg.stop()


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay a refusal carries, if any."""
    for key, value in err.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


async def health_of(stack: Stack, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(stack.channels[service].channel_of(OPERATOR))
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def drain(stream: Any) -> list[Any]:
    """Every message of a server-streaming call."""
    return [item async for item in stream]


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {within:.0f} s")
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_a_database_outage_answers_unavailable_and_health_follows_the_database(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    ch = stack.channels
    eligibility = eligibility_pb2_grpc.EligibilityServiceStub(ch["eligibility"])
    ledger = ledger_pb2_grpc.LedgerServiceStub(ch["ledger"])
    audit = audit_pb2_grpc.AuditServiceStub(ch["audit"])
    catalog = catalog_pb2_grpc.CatalogServiceStub(ch["catalog"])
    authority = identity_pb2_grpc.IdentitySimulatorAdminStub(ch["identity_sim"])
    rng = random.Random(15)
    people = [make_person(rng) for _ in range(2)]
    for p in people:
        await authority.Enroll(
            identity_pb2.EnrollRequest(name=p.name, id_number=p.id_number, phone=p.phone)
        )
    first = await eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=people[0].name,
            id_number=people[0].id_number,
            phone=people[0].phone,
            platform_id="jd",
        )
    )
    for s in SERVICES:
        assert await health_of(stack, s) == health_pb2.HealthCheckResponse.SERVING

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "RegisterConsumer": lambda: eligibility.RegisterConsumer(
            eligibility_pb2.RegisterConsumerRequest(
                name=people[1].name,
                id_number=people[1].id_number,
                phone=people[1].phone,
                platform_id="jd",
            )
        ),
        "ClaimQualification": lambda: eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                circumstances=IN_REGION,
                consumer_id=first.consumer_id,
                category="phone",
                channel="jd",
            )
        ),
        "ReserveSubsidy": lambda: ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id="outage-1",
                platform_id="jd",
                pool_id="pingshan-2025",
                consumer_id=first.consumer_id,
                qualification_id="q-none",
                sku="demo-phone",
                unit_price_fen=300_000,
            )
        ),
        "CaptureSubsidy": lambda: ledger.CaptureSubsidy(
            ledger_pb2.CaptureSubsidyRequest(order_id="outage-1", payment_ref="pay-1")
        ),
        "GetBudget": lambda: ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id="p")),
        "GetLogInfo": lambda: audit.GetLogInfo(audit_pb2.GetLogInfoRequest()),
        "GetProduct": lambda: catalog.GetProduct(catalog_pb2.GetProductRequest(sku="none")),
        # A streaming answer: its servicer maps its own refusals; the outage is the kernel's.
        "GetReconciliation": lambda: drain(
            ledger.GetReconciliation(ledger_pb2.GetReconciliationRequest(file_sha256="a" * 64))
        ),
    }

    stack.pg.stop()
    outage_started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            err = refused.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)
            info = rpc.error_info(err)
            assert info is not None and info.reason.endswith("_UNAVAILABLE"), (name, info)
            delay = retry_delay_s(err)
            assert delay is not None and 0 < delay <= 5, (name, delay)
        for s in SERVICES:

            async def not_serving(s: str = s) -> bool:
                return bool(await health_of(stack, s) == health_pb2.HealthCheckResponse.NOT_SERVING)

            await until(not_serving, 10, f"{s} NOT_SERVING")
        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - outage_started)))
    unhandled = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert unhandled == [], [f"{r.name}: {r.getMessage()}" for r in unhandled]

    stack.pg.start()
    for s in SERVICES:

        async def serving(s: str = s) -> bool:
            return bool(await health_of(stack, s) == health_pb2.HealthCheckResponse.SERVING)

        await until(serving, 15, f"{s} SERVING again")
    answered = await audit.GetLogInfo(audit_pb2.GetLogInfoRequest())
    assert answered.size > 0
    second = await calls["RegisterConsumer"]()
    assert second.consumer_id and second.consumer_id != first.consumer_id
    qualification = await calls["ClaimQualification"]()
    assert qualification.qualification_id
