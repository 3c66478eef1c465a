"""All four services and the identity simulator, started in the test's event loop.

The services run exactly the code their processes run (services.kernel.app.start) against the
session's real PostgreSQL, NATS and OpenBao; in-process so the in-memory span exporter sees every
span of a checkout. tests/e2e/test_processes.py covers the separate-process stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from services.kernel import natsauth, rpc
from services.kernel.app import Running
from services.kernel.telemetry import configure_tracing
from subsidy.v1 import (
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    eligibility_pb2,
    eligibility_pb2_grpc,
    eventlog_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)
from subsidyctl.demo import IN_REGION, load_demo, write_demo_policy
from subsidyctl.inprocess import SPECS, start_platform
from subsidyctl.stack import Nats, free_port
from tests.conftest import Infra
from tests.support.callers import CallerRouter
from tests.support.identities import Person, make_person

SPANS = InMemorySpanExporter()
T = TypeVar("T")

# The policy the session platform starts with (subsidyctl/demo.yaml): claims open all day.
DEMO_POLICY_VERSION: str = load_demo()["policy"]["version"]


# The platforms the tests check out through; the pools they fund pay these.
TEST_PLATFORMS = ("jd", "taobao", "tmall")


@dataclass
class Platform:
    infra: Infra
    running: dict[str, Running]
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub
    eligibility: eligibility_pb2_grpc.EligibilityServiceAsyncStub
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub
    audit: audit_pb2_grpc.AuditServiceAsyncStub
    authority: identity_pb2_grpc.IdentitySimulatorAdminAsyncStub
    spans: InMemorySpanExporter
    nats_url: str  # the platform's own NATS server (not infra.nats)
    nats_operator: natsauth.Credentials  # its unrestricted user, for tests that read the bus
    # Every service's own store, listed (what subsidyctl audit verify compares the log with).
    event_logs: dict[str, eventlog_pb2_grpc.EventLogServiceAsyncStub]

    async def quiesce(self, within: float = 30.0) -> None:
        """Wait until every durable consumer of every service has handled every stored event
        that matches its subjects (the platform is quiet; read models and audit are final)."""

        async def stored() -> list[str]:
            subjects: list[str] = []
            for name, r in self.running.items():
                async with r.runtime.store.engine.connect() as conn:
                    rows = await conn.execute(text("SELECT event_type FROM events"))
                    subjects += [f"events.{name}.{t.rsplit('.', 1)[-1]}" for (t,) in rows]
            return subjects

        async def check() -> None:
            subjects = await stored()
            for r in self.running.values():
                for c in r.wiring.consumers:
                    expected = sum(
                        1 for s in subjects if any(subject_matches(f, s) for f in c.subjects)
                    )
                    async with r.runtime.store.engine.connect() as conn:
                        handled = await conn.scalar(
                            text("SELECT count(*) FROM handled_events WHERE consumer = :c"),
                            {"c": c.name},
                        )
                    assert handled == expected, f"{c.name} has handled {handled} of {expected}"
            # A handler that ran while the counts were read may have appended an event of its
            # own (eligibility's, on a ledger event) after the stores were read: quiet only if
            # no store grew meanwhile.
            assert len(await stored()) == len(subjects), "an event was stored while counting"

        await eventually(check, within=within)

    async def person(self, rng: random.Random) -> tuple[Person, str]:
        """A generated person, enrolled at the simulated authority and registered."""
        p = make_person(rng)
        await self.authority.Enroll(
            identity_pb2.EnrollRequest(name=p.name, id_number=p.id_number, phone=p.phone)
        )
        c = await self.eligibility.RegisterConsumer(
            eligibility_pb2.RegisterConsumerRequest(
                name=p.name, id_number=p.id_number, phone=p.phone, platform_id="jd"
            )
        )
        return p, c.consumer_id

    async def claim(self, consumer_id: str, category: str, channel: str = "jd") -> str:
        """Claim a qualification for ``consumer_id``; returns its id."""
        q = await self.eligibility.ClaimQualification(
            eligibility_pb2.ClaimQualificationRequest(
                circumstances=IN_REGION, consumer_id=consumer_id, category=category, channel=channel
            )
        )
        return str(q.qualification_id)

    async def product(self, rng: random.Random, category: str, grade: int, price_fen: int) -> str:
        """An approved merchant's product; returns its SKU."""
        n = rng.randrange(10**9)
        merchant = f"m-{n}"
        await self.catalog.ApplyMerchant(
            catalog_pb2.ApplyMerchantRequest(
                merchant_id=merchant,
                name=f"商户{n}",
                licence_number="91440300MA5DC6QX4Y",
                contact_phone="13800000000",
            )
        )
        await self.catalog.ReviewMerchant(
            catalog_pb2.ReviewMerchantRequest(merchant_id=merchant, approve=True)
        )
        sku = f"sku-{n}"
        await self.catalog.RegisterProduct(
            catalog_pb2.RegisterProductRequest(
                sku=sku,
                merchant_id=merchant,
                category=category,
                grade=grade,
                brand="Brand",
                model=f"M{n}",
                list_price_fen=price_fen,
            )
        )
        return sku

    async def pool(self, rng: random.Random, fen: int) -> str:
        pool_id = f"pool-{rng.randrange(10**9)}"
        await self.fund(
            ledger_pb2.ProposeFundingRequest(
                pool_id=pool_id,
                amount_fen=fen,
                source="district",
                platform_ids=TEST_PLATFORMS,
            )
        )
        return pool_id

    async def fund(self, request: ledger_pb2.ProposeFundingRequest) -> ledger_pb2.BudgetPool:
        """Funding as the bureau does it: an operator proposes, a different approver approves."""
        proposal = await self.ledger.ProposeFunding(request)
        approved = await self.ledger.ApproveFunding(
            ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="ok")
        )
        return approved.pool


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


async def eventually(check: Callable[[], Awaitable[T]], *, within: float = 15.0) -> T:
    """Poll ``check`` until it returns without AssertionError (events are asynchronous)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await check()
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
async def platform(infra: Infra) -> AsyncIterator[Platform]:
    # Its own NATS: the audit log records every event on the bus, and the kernel tests publish
    # synthetic ones to the session's server.
    nats = Nats(
        store_dir=infra.root / "nats-platform",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=infra.root / "logs",
        accounts=natsauth.provision(infra.bao.client()),  # the session's seeds, its own server
    )
    nats.start()
    try:
        async with platform_on(infra, nats.url, nats.operator) as p:
            yield p
    finally:
        nats.stop()


@contextlib.asynccontextmanager
async def platform_on(
    infra: Infra, nats_url: str, nats_operator: natsauth.Credentials
) -> AsyncIterator[Platform]:
    """The four services and the simulator on fresh databases of the session's PostgreSQL,
    over the NATS at ``nats_url`` (one server, or a cluster's nodes comma-separated)."""
    configure_tracing("tests", exporter=SPANS)
    identities = infra.identities  # the CA exists before any service asks it for a certificate
    # Each service migrates as the migration role and runs as the runtime role.
    databases = {spec.name: infra.create_service_database(spec.name) for spec in SPECS}
    started = await start_platform(
        lambda name: databases[name].runtime_url,
        nats_url,
        infra.bao.addr,
        infra.bao.token,
        migration_database_url=lambda name: databases[name].migration_url,
        initial_policy=write_demo_policy(infra.root),  # claims open all day
        # Tests move a service's clock forward; a background sweep at such a moment would
        # expire every other test's qualifications. The expiry tests sweep themselves.
        expiry_sweep_s=3600,
        # The ledger sweeps every second: a reservation one test left pending would expire 15
        # minutes later (an attempt a cancelled call left, a minute later) in the middle of
        # another test's "nothing changed" comparison (tests/e2e/test_rejections.py saw both
        # services move on CI). A day outlives the session; the expiry tests move the ledger's
        # clock and tests/e2e/test_saga.py sweeps abandoned attempts itself.
        reservation_timeout_s=86_400,
        abandon_after_s=86_400,
        # Likewise the fraud detectors: the session's tests would be findings of each other
        # (tests/e2e/test_detection.py runs them itself).
        detect_every_s=3600,
        # The admission bound in front of every service, as production sets one, but far above
        # what the race and rush tests send at once (tests/kernel/test_admission.py binds it).
        max_concurrent=10_000,
    )
    running = started.running
    peers = started.endpoints
    channels = {name: CallerRouter(addr, identities) for name, addr in peers.items()}
    p = Platform(
        infra=infra,
        running=running,
        catalog=catalog_pb2_grpc.CatalogServiceStub(channels["catalog"]),
        eligibility=eligibility_pb2_grpc.EligibilityServiceStub(channels["eligibility"]),
        ledger=ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
        audit=audit_pb2_grpc.AuditServiceStub(channels["audit"]),
        authority=identity_pb2_grpc.IdentitySimulatorAdminStub(channels["identity_sim"]),
        spans=SPANS,
        nats_url=nats_url,
        nats_operator=nats_operator,
        event_logs={
            name: eventlog_pb2_grpc.EventLogServiceStub(channels[name]) for name in running
        },
    )

    async def policy_reached_eligibility() -> None:
        # Eligibility learns the policy from catalog's events.
        e = running["eligibility"].runtime.store
        async with e.engine.connect() as conn:
            assert (await conn.scalar(text("SELECT count(*) FROM policies"))) >= 1

    try:
        await eventually(policy_reached_eligibility)
        yield p
    finally:
        for ch in channels.values():
            await ch.close()
        await started.stop()


@pytest.fixture(autouse=True)
async def limits_hold_after_each_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After every test on the shared platform: the per-person limits (linked consumers counted
    as one person) and the daily quotas hold over everything the session has done so far."""
    yield
    if "platform" in request.fixturenames:
        p: Platform = request.getfixturevalue("platform")
        await p.running["eligibility"].wiring.registrations[0][1].e.check_limits()


def status_of(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, field) of a failed call."""
    info = rpc.error_info(err)
    return err.code(), info.reason if info else "", (info.metadata.get("field", "") if info else "")
