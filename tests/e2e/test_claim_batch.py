"""Claims decided in batches (services/eligibility/claim_batch.py), on a real PostgreSQL.

The quota stays exact when two eligibility processes (two stores, two batchers, one database)
take a rush at once; the batch loads what the single claim loads; a refusal in a batch is only
its own claim's; a batch that fails is retried claim by claim; each event keeps its own
caller's correlation and trace.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from services.eligibility import domain
from services.eligibility.authority import Verdict
from services.eligibility.claim_batch import ClaimBatcher, load_claims
from services.eligibility.handlers import (
    CLAIM,
    CONSUMER,
    SERVICE,
    ClaimKey,
    Eligibility,
    _load_claim,
    check_limits,
)
from services.eligibility.linking import Identifier, Kind
from services.eligibility.projections import apply_event, apply_events, metadata
from services.kernel import vault
from services.kernel.contract.policy import Policy, default_policy, policy_from_dict, policy_to_dict
from services.kernel.contract.policy_proto import policy_to_proto
from services.kernel.errors import DomainError, NotFound, ResourceExhausted
from services.kernel.events import Context, new_envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.pipeline import Pipeline
from services.kernel.riskscreen import Circumstances
from services.kernel.telemetry import configure_tracing, tracer
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev
from subsidyctl.demo import DEMO_REGION
from tests.conftest import Infra
from tests.e2e.conftest import SPANS

PLATFORM = common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd")
IN_REGION = Circumstances(region_code=DEMO_REGION)


class NoAuthority:
    """Nobody registers through these tests' Eligibility (consumers are made by the pipeline)."""

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict:
        raise AssertionError("not asked in these tests")


def policy_with(quota: int) -> Policy:
    doc = policy_to_dict(default_policy())
    doc["version"] = f"batch-test-{uuid.uuid4().hex[:8]}"
    doc["claim_window"] = {**doc["claim_window"], "opens": "00:00", "closes": "24:00"}
    for rule in doc["categories"]:
        if rule["code"] == "phone":
            rule["daily_quota"] = quota
    return policy_from_dict(doc)


@dataclass
class Replicas:
    """Eligibility as two processes would run it: two stores (engines) on one database."""

    first: Eligibility
    second: Eligibility
    policy: Policy

    @property
    def store(self) -> EventStore:
        return self.first.store

    async def consumers(self, count: int, platform: str = "jd") -> list[str]:
        """``count`` registered consumers (through the pipeline, with the decision's events)."""
        pipeline = Pipeline(self.store, SERVICE, apply_event, project_many=apply_events)
        commands = []
        for _ in range(count):
            cid = f"c-{uuid.uuid4().hex}"
            commands.append(
                domain.Register(
                    consumer_id=cid,
                    platform_id=platform,
                    name_sealed=b"sealed",
                    id_number_sealed=b"sealed",
                    phone_sealed=b"sealed",
                    id_number_index=f"idx-{cid}",
                    phone_index=f"phone-{cid}",
                    id_number_masked="110105**********2X",
                    phone_masked="138****0000",
                )
            )
        async with self.store.transaction() as tx:
            await pipeline.run_many(
                CONSUMER,
                [(c.consumer_id, registering(c)) for c in commands],
                Context(PLATFORM),
                tx=tx,
            )
        return [c.consumer_id for c in commands]


def registering(command: domain.Register) -> Callable[[Any], list[Message]]:
    return lambda existing: domain.register(existing, command)


@pytest.fixture
async def replicas(infra: Infra) -> AsyncIterator[Replicas]:
    url = infra.create_database("claims")
    first, second = (EventStore(make_engine(url, pool_size=8)) for _ in range(2))
    await first.create_tables(metadata)
    keys = vault.connect(infra.bao.addr, token=infra.bao.token)
    e1, e2 = (Eligibility(s, keys, NoAuthority()) for s in (first, second))
    policy = policy_with(quota=40)
    published = ev.PolicyPublished(version=policy.version, policy=policy_to_proto(policy))
    published.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    env = new_envelope("catalog", f"policy/{policy.version}", published, Context(PLATFORM))
    async with first.transaction() as tx:  # as catalog's PolicyPublished reaches eligibility
        await e1.policies.on_policy_published(tx, env)
    try:
        yield Replicas(e1, e2, policy)
    finally:
        await first.engine.dispose()
        await second.engine.dispose()


async def outcome(claim: Any) -> str:
    try:
        q = await claim
    except DomainError as refusal:
        return refusal.reason
    assert isinstance(q, domain.Qualification) and q.status == domain.AVAILABLE
    return "ISSUED"


async def test_two_processes_in_a_rush_issue_exactly_the_quota(replicas: Replicas) -> None:
    r = replicas
    people = await r.consumers(120)
    claims = [
        outcome((r.first if i % 2 else r.second).claim(c, "phone", "jd", PLATFORM, IN_REGION))
        for i, c in enumerate(people)
    ]
    results = await asyncio.gather(*claims)
    assert results.count("ISSUED") == 40
    assert results.count("DAILY_QUOTA_EXHAUSTED") == 80
    # The claims were decided in batches, in both processes.
    assert r.first.claims.commit.stats.largest > 1 and r.second.claims.commit.stats.largest > 1
    await check_limits(r.store.engine, r.policy)
    # Every qualification answered is the one recorded.
    async with r.store.engine.connect() as conn:
        recorded = await load_claims(conn, [key(c, r.policy) for c in people])
    now = dt.datetime.now(dt.UTC)
    assert sum(domain.held(s.qualifications, now) for s in recorded.values()) == 40


def key(consumer_id: str, policy: Policy, category: str = "phone", **kw: Any) -> ClaimKey:
    now = kw.pop("now", dt.datetime.now(dt.UTC))
    platform = kw.pop("platform", "jd")
    return ClaimKey(consumer_id, platform, category, domain.quota_day(policy, now), now)


async def test_the_batch_loads_what_a_single_claim_loads(replicas: Replicas) -> None:
    r = replicas
    fresh, holder, expired, elsewhere = await r.consumers(4)
    [tmall_only] = await r.consumers(1, platform="tmall")
    await r.first.claim(holder, "phone", "jd", PLATFORM, IN_REGION)
    validity = dt.timedelta(days=r.policy.qualification_validity_days)
    long_ago = dt.datetime.now(dt.UTC) - validity - dt.timedelta(hours=1)
    r.first.clock = lambda: long_ago
    await r.first.claim(expired, "phone", "jd", PLATFORM, IN_REGION)  # expired unused by now
    await r.first.claim(elsewhere, "tv", "jd", PLATFORM, IN_REGION)  # another category
    now = dt.datetime.now(dt.UTC)
    keys = [
        key(c, r.policy, now=now)
        for c in (fresh, holder, expired, elsewhere, tmall_only, "c-never-registered")
    ]
    keys += [key(holder, r.policy, "tv", now=now), key(elsewhere, r.policy, "tv", now=now)]
    keys += [key(fresh, r.policy, now=now, platform="tmall")]
    keys += [key(holder, r.policy, now=long_ago)]  # another day: no quota row yet
    async with r.store.transaction() as tx:
        single = {k: await _load_claim(tx.conn, k) for k in keys}
        batched = await load_claims(tx.conn, keys)
    assert batched == single
    assert [domain.held(single[k].qualifications, now) for k in keys[:4]] == [0, 1, 0, 0]
    assert [single[k].registered for k in keys[4:6]] == [False, False]


async def test_a_refusal_in_a_batch_is_only_its_own_and_each_event_keeps_its_caller(
    replicas: Replicas,
) -> None:
    configure_tracing("tests", exporter=SPANS)  # as the platform fixture does
    r = replicas
    e = r.first
    a, b, c = await r.consumers(3)
    await e.claim(c, "phone", "jd", PLATFORM, IN_REGION)  # c holds the one phone a person may have
    # The policy is in memory from here on, so the four below reach the batcher in one turn of
    # the event loop, and are one batch.
    e.policies.refresh_s = 3600

    async def traced(consumer: str) -> tuple[str, str]:
        with tracer().start_as_current_span(f"claim by {consumer}") as span:
            result = await outcome(e.claim(consumer, "phone", "jd", PLATFORM, IN_REGION))
            return result, format(span.get_span_context().trace_id, "032x")

    results = await asyncio.gather(traced(a), traced("c-nobody"), traced(c), traced(b))
    assert [res for res, _ in results] == [
        "ISSUED",
        "UNKNOWN_CONSUMER",
        "PERSON_LIMIT_REACHED",
        "ISSUED",
    ]
    assert e.claims.commit.stats.largest == 4
    claimed: dict[str, tuple[ev.QualificationClaimed, Any]] = {}
    for recorded in await e.store.read_all():
        event = payload_of(recorded.envelope)
        if isinstance(event, ev.QualificationClaimed):
            claimed[event.consumer_id] = (event, recorded.envelope)
    for consumer, (_, trace_id) in zip((a, b), (results[0], results[3]), strict=True):
        event, env = claimed[consumer]
        assert env.correlation_id == event.qualification_id
        assert trace_id in env.trace_context["traceparent"]  # its caller's trace, not the batch's


async def test_a_batch_that_fails_is_retried_claim_by_claim(replicas: Replicas) -> None:
    r = replicas
    e = r.first
    batcher = ClaimBatcher(e.store, e.pipeline, CLAIM)  # the three below reach it in one turn
    a, b = await r.consumers(2)
    now = dt.datetime.now(dt.UTC)
    policy = r.policy

    def claiming(consumer: str) -> Callable[[domain.ClaimState | None], list[Message]]:
        command = domain.Claim(consumer, "phone", "jd", f"q-{uuid.uuid4().hex}", now, DEMO_REGION)
        return lambda state: domain.claim(state or domain.ClaimState(False, (), 0), command, policy)

    def broken(state: domain.ClaimState | None) -> list[Message]:
        raise RuntimeError("a bug in one decision")

    ctx = Context(service_actor("test"))
    results = await asyncio.gather(
        batcher.run(key(a, policy, now=now), claiming(a), ctx),
        batcher.run(key("c-x", policy, now=now), broken, ctx),
        batcher.run(key(b, policy, now=now), claiming(b), ctx),
        return_exceptions=True,
    )
    assert batcher.commit.stats.largest == 3
    assert isinstance(results[1], RuntimeError)
    for issued in (results[0], results[2]):
        assert not isinstance(issued, BaseException) and len(issued.appended) == 1
    await check_limits(e.store.engine, policy)


async def test_a_refusal_reaches_the_caller_as_the_domain_error_it_is(replicas: Replicas) -> None:
    # (the gRPC edge maps it; here the use case raises the decision's own error)
    r = replicas
    with pytest.raises(NotFound):
        await r.first.claim("c-nobody", "phone", "jd", PLATFORM, IN_REGION)
    [a] = await r.consumers(1)
    await r.first.claim(a, "phone", "jd", PLATFORM, IN_REGION)
    with pytest.raises(ResourceExhausted) as err:
        await r.first.claim(a, "phone", "jd", PLATFORM, IN_REGION)
    assert err.value.reason == "PERSON_LIMIT_REACHED"
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_linked_consumers_in_one_batch_are_one_person_for_the_limit(
    replicas: Replicas,
) -> None:
    """Two consumers sharing a device are one person: claimed at once, in one batch, one
    phone is issued and the other claim is refused with the person's limit."""
    r = replicas
    e = r.first
    pairs = [await r.consumers(2) for _ in range(3)]
    for n, (a, b) in enumerate(pairs):
        device = Identifier(Kind.DEVICE, f"device-index-{uuid.uuid4().hex}", f"de***{n:02d}")
        for consumer in (a, b):
            await e.persons.identify(consumer, "jd", [device], PLATFORM)
    e.policies.refresh_s = 3600  # the policy in memory: the six claims reach one batch
    await e.policies.in_force()
    results = await asyncio.gather(
        *(outcome(e.claim(c, "phone", "jd", PLATFORM, IN_REGION)) for pair in pairs for c in pair)
    )
    assert e.claims.commit.stats.largest >= 2
    for i in range(len(pairs)):
        assert sorted(results[2 * i : 2 * i + 2]) == ["ISSUED", "PERSON_LIMIT_REACHED"]
    await check_limits(r.store.engine, r.policy)
