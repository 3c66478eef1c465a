"""Eligibility's hot path reads a qualification once a command (handlers._on_qualification):
the projection is handed the state the decision was made on and the answer is the state the
projection wrote. On a real PostgreSQL, every answer along a qualification's life is checked
against the row read back, including the case where the row keeps what the event does not
say (a restore at once after a restore "next day" leaves the earlier date in its table)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from services.eligibility import domain
from services.eligibility.authority import Verdict
from services.eligibility.handlers import CONSUMER, SERVICE, Eligibility
from services.eligibility.projections import (
    apply_event,
    apply_events,
    load_qualification,
    metadata,
)
from services.kernel import vault
from services.kernel.contract.policy import Policy, default_policy, policy_from_dict, policy_to_dict
from services.kernel.contract.policy_proto import policy_to_proto
from services.kernel.errors import FailedPrecondition
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.pipeline import Pipeline
from services.kernel.riskscreen import Circumstances
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev
from subsidyctl.demo import DEMO_REGION
from tests.conftest import Infra

PLATFORM = common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd")
LEDGER = service_actor("ledger")
IN_REGION = Circumstances(region_code=DEMO_REGION)


class NoAuthority:
    """Nobody registers through this Eligibility (the consumer is made by the pipeline)."""

    async def verify(self, name: str, id_number: str, phone: str) -> Verdict:
        raise AssertionError("not asked in these tests")


def policy(refund_rule: str, effective_from: dt.datetime) -> Policy:
    doc = policy_to_dict(default_policy())
    doc["version"] = f"hotpath-{refund_rule}-{uuid.uuid4().hex[:8]}"
    doc["effective_from"] = effective_from.isoformat()
    doc["claim_window"] = {**doc["claim_window"], "opens": "00:00", "closes": "24:00"}
    doc["refund_rule"] = refund_rule
    return policy_from_dict(doc)


@dataclass
class Setup:
    e: Eligibility
    next_day: Policy
    at_once: Policy
    forfeit: Policy
    now: list[dt.datetime]


async def publish(e: Eligibility, p: Policy) -> None:
    published = ev.PolicyPublished(version=p.version, policy=policy_to_proto(p))
    published.effective_from.FromDatetime(p.effective_from.astimezone(dt.UTC))
    env = new_envelope("catalog", f"policy/{p.version}", published, Context(PLATFORM))
    async with e.store.transaction() as tx:
        await e.policies.on_policy_published(tx, env)


@pytest.fixture
async def setup(infra: Infra) -> AsyncIterator[Setup]:
    store = EventStore(make_engine(infra.create_database("hotpath"), pool_size=4))
    await store.create_tables(metadata)
    now = [dt.datetime.now(dt.UTC)]
    e = Eligibility(
        store,
        vault.connect(infra.bao.addr, token=infra.bao.token),
        NoAuthority(),
        clock=lambda: now[0],
    )
    e.policies.refresh_s = 0  # the test moves the clock: the policy in force is looked up again
    older = now[0] - dt.timedelta(days=30)
    at_once = policy("restore", older)
    forfeit = policy("forfeit", older + dt.timedelta(seconds=1))
    next_day = policy("restore_next_day", older + dt.timedelta(seconds=2))  # the one in force
    for p in (at_once, forfeit, next_day):
        await publish(e, p)
    try:
        yield Setup(e, next_day, at_once, forfeit, now)
    finally:
        await store.engine.dispose()


async def a_consumer(e: Eligibility) -> str:
    cid = f"c-{uuid.uuid4().hex}"
    command = domain.Register(
        consumer_id=cid,
        platform_id="jd",
        name_sealed=b"sealed",
        id_number_sealed=b"sealed",
        phone_sealed=b"sealed",
        id_number_index=f"idx-{cid}",
        phone_index=f"phone-{cid}",
        id_number_masked="110105**********2X",
        phone_masked="138****0000",
    )
    pipeline = Pipeline(e.store, SERVICE, apply_event, project_many=apply_events)
    await pipeline.run(
        CONSUMER, cid, lambda existing: domain.register(existing, command), Context(PLATFORM)
    )
    return cid


async def recorded(e: Eligibility, qid: str) -> domain.Qualification | None:
    async with e.store.engine.connect() as conn:
        return await load_qualification(conn, qid)


def from_ledger(
    event: ev.SubsidyCaptured | ev.SubsidyReleased, p: Policy, at: dt.datetime
) -> Envelope:
    env = new_envelope(
        "ledger", f"order/{event.order_id}", event, Context(LEDGER, policy_version=p.version)
    )
    env.occurred_at.FromDatetime(at)
    return env


async def settle(e: Eligibility, env: Envelope) -> None:
    async with e.store.transaction() as tx:
        await e.on_ledger_event(tx, env)


async def test_every_answer_is_the_row_as_recorded(setup: Setup) -> None:
    e, now = setup.e, setup.now
    cid = await a_consumer(e)
    q = await e.claim(cid, "phone", "jd", PLATFORM, IN_REGION)
    qid = q.qualification_id

    async def lock(order: str) -> domain.Qualification:
        answered = await e.lock(qid, order, "phone", cid, LEDGER, "jd")
        assert answered == await recorded(e, qid)
        return answered

    async def refunded(order: str, p: Policy) -> domain.Qualification | None:
        await settle(
            e, from_ledger(ev.SubsidyCaptured(order_id=order, qualification_id=qid), p, now[0])
        )
        used = await recorded(e, qid)
        assert used is not None and used.status == domain.USED and used.order_id == order
        released = ev.SubsidyReleased(
            order_id=order, qualification_id=qid, reason="REFUNDED", was_captured=True
        )
        await settle(e, from_ledger(released, p, now[0]))
        return await recorded(e, qid)

    locked = await lock("o-1")
    assert locked.status == domain.LOCKED and locked.order_id == "o-1"
    assert await lock("o-1") == locked  # the ledger's retry: nothing appended, same answer

    # Refunded under the "next day" rule: available, lockable from tomorrow only.
    restored = await refunded("o-1", setup.next_day)
    assert restored is not None and restored.status == domain.AVAILABLE
    assert restored.available_from is not None and restored.available_from > now[0]
    with pytest.raises(FailedPrecondition) as refused:
        await e.lock(qid, "o-2", "phone", cid, LEDGER, "jd")
    assert refused.value.reason == "QUALIFICATION_NOT_YET_AVAILABLE"
    assert await recorded(e, qid) == restored  # the refusal wrote nothing

    # The next day: locked, paid and refunded again under the "at once" rule. The event says
    # no date, so the row keeps the earlier one, and so does every answer after it.
    now[0] = restored.available_from + dt.timedelta(minutes=1)
    await lock("o-2")
    again = await refunded("o-2", setup.at_once)
    assert again is not None and again.available_from == restored.available_from
    relocked = await lock("o-3")
    assert relocked.available_from == restored.available_from

    # A release of an order the qualification no longer holds changes nothing.
    stale = ev.SubsidyReleased(order_id="o-2", qualification_id=qid, reason="CANCELLED")
    await settle(e, from_ledger(stale, setup.at_once, now[0]))
    assert await recorded(e, qid) == relocked

    # Forfeited by a refund, then restored by a supervision case: its answer is the row too,
    # the earlier date kept (the case's event names none).
    forfeited = await refunded("o-3", setup.forfeit)
    assert forfeited is not None and forfeited.status == domain.FORFEITED
    answered = await e.restore_by_case(qid, "case-1", common_pb2.Actor(reason="shipped nothing"))
    assert answered == await recorded(e, qid)
    assert answered.status == domain.AVAILABLE
    assert answered.available_from == restored.available_from


async def test_an_expired_qualification_is_swept_as_recorded(setup: Setup) -> None:
    e, now = setup.e, setup.now
    q = await e.claim(await a_consumer(e), "phone", "jd", PLATFORM, IN_REGION)
    now[0] = q.expires_at + dt.timedelta(seconds=1)
    assert await e.expire_due() == 1
    swept = await recorded(e, q.qualification_id)
    assert swept is not None and swept.status == domain.EXPIRED
    assert swept == replace(q, status=domain.EXPIRED)
    assert await e.expire_due() == 0
