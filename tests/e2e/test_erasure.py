"""Erasure (EraseConsumer) on the real stack: the consumer's data key is destroyed, so nothing
decrypts their data; limits still count what they used (through their blind indexes and their
person); the audit log still verifies, with their events in it. Refusals change nothing.
"""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from services.audit import log as audit_log
from services.audit.verify import replay
from services.eligibility.handlers import Eligibility
from services.kernel.errors import NotFound
from services.kernel.events import payload_of
from subsidy.v1 import common_pb2, eligibility_pb2, identity_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform, status_of
from tests.e2e.test_audit_crosscheck import run_cli
from tests.e2e.test_personal_data import audit_caught_up
from tests.support.identities import make_person

OPERATOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="ops")


def eligibility_of(p: Platform) -> Eligibility:
    e = p.running["eligibility"].wiring.registrations[0][1].e
    assert isinstance(e, Eligibility)
    return e


async def erase(p: Platform, consumer: str, reason: str) -> eligibility_pb2.ConsumerErasure:
    return await p.eligibility.EraseConsumer(
        eligibility_pb2.EraseConsumerRequest(consumer_id=consumer, reason=reason)
    )


async def refused(p: Platform, consumer: str, reason: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await erase(p, consumer, reason)
    return status_of(err.value)


async def test_an_erased_consumer_is_unreadable_their_limits_count_and_the_audit_verifies(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    e = eligibility_of(p)
    store = p.running["eligibility"].runtime.store
    person = make_person(rng)
    device = f"dev-{rng.randrange(16**12):012x}"
    await p.authority.Enroll(
        identity_pb2.EnrollRequest(name=person.name, id_number=person.id_number, phone=person.phone)
    )
    registration = eligibility_pb2.RegisterConsumerRequest(
        name=person.name,
        id_number=person.id_number,
        phone=person.phone,
        platform_id="jd",
        identifiers=eligibility_pb2.Identifiers(device_id=device),
    )
    erased = (await p.eligibility.RegisterConsumer(registration)).consumer_id
    await p.claim(erased, "phone")
    assert (await e.reveal(erased))["id_number"] == person.id_number  # readable until erased
    async with store.engine.connect() as conn:
        wrapped = await conn.scalar(
            text("SELECT wrapped_key FROM person_keys WHERE consumer_id = :c"), {"c": erased}
        )
    assert wrapped is not None and wrapped in e.vault._dek_cache  # reveal unwrapped it

    done = await erase(p, erased, "the consumer withdrew their consent")
    assert done.consumer_id == erased and done.erased_at.seconds > 0

    # Nothing decrypts their data: the wrapped key is gone from the store and from the cache.
    with pytest.raises(NotFound) as gone:
        await e.reveal(erased)
    assert gone.value.reason == "PERSON_SHREDDED"
    async with store.engine.connect() as conn:
        keys = await conn.scalar(
            text("SELECT count(*) FROM person_keys WHERE consumer_id = :c"), {"c": erased}
        )
    assert keys == 0
    assert wrapped not in e.vault._dek_cache  # the unwrapped key must not outlive the row
    # What is left is ciphertext no key opens: the registration event still holds it.
    events = await store.read_stream(f"consumer/{erased}")
    registered = payload_of(events[0])
    assert isinstance(registered, ev.ConsumerRegistered) and registered.id_number_sealed
    assert person.id_number.encode() not in events[0].SerializeToString()
    erasure = payload_of(events[-1])
    assert isinstance(erasure, ev.ConsumerErased)
    assert erasure.reason == "the consumer withdrew their consent"
    assert events[-1].actor.kind == common_pb2.Actor.KIND_OPERATOR
    assert events[-1].actor.reason == erasure.reason

    # Limits still count what they used: a consumer on their device is the same person, whose
    # phone is taken; the erased consumer is served by no platform and cannot register again.
    other = make_person(rng)
    await p.authority.Enroll(
        identity_pb2.EnrollRequest(name=other.name, id_number=other.id_number, phone=other.phone)
    )
    newcomer = (
        await p.eligibility.RegisterConsumer(
            eligibility_pb2.RegisterConsumerRequest(
                name=other.name,
                id_number=other.id_number,
                phone=other.phone,
                platform_id="jd",
                identifiers=eligibility_pb2.Identifiers(device_id=device),
            )
        )
    ).consumer_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.claim(newcomer, "phone")
    assert status_of(err.value)[1] == "PERSON_LIMIT_REACHED"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.claim(erased, "tablet")
    assert status_of(err.value) == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_CONSUMER",
        "consumer_id",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.eligibility.RegisterConsumer(registration)
    assert status_of(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSUMER_ERASED",
        "consumer_id",
    )
    explained = await p.eligibility.GetPerson(
        eligibility_pb2.GetPersonRequest(consumer_id=newcomer)
    )
    members = {c.consumer_id: c for c in explained.consumers}
    assert set(members) == {erased, newcomer}
    assert members[erased].erased and not members[erased].platform_ids
    assert (members[erased].id_number_masked, members[erased].phone_masked) == ("", "")
    [link] = explained.links
    assert link.kind == "DEVICE" and link.masked == f"{device[:2]}***{device[-2:]}"
    await e.check_limits()

    # Refusals: twice, no reason, nobody; none records anything.
    await p.quiesce()
    count = await store.count()
    assert await refused(p, erased, "again") == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSUMER_ERASED",
        "consumer_id",
    )
    assert await refused(p, newcomer, "  ") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FIELD",
        "reason",
    )
    assert await refused(p, "c-nobody", "why") == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_CONSUMER",
        "consumer_id",
    )
    assert await store.count() == count
    async with store.engine.connect() as conn:
        assert await conn.scalar(
            text("SELECT count(*) FROM person_keys WHERE consumer_id = :c"), {"c": newcomer}
        )

    # The audit log still verifies end to end and still holds every event of the erased
    # consumer, and the auditor's cross-check of log against stores passes.
    await audit_caught_up(p)
    audit_store = p.running["audit"].runtime.store
    size, head, _ = await audit_log.info(audit_store)
    entries = await audit_log.read(audit_store, 0, size + 1)
    assert replay(entries).head == head
    logged = {ev.EventEnvelope.FromString(data).event_id for _, _, _, data in entries}
    assert {env.event_id for env in events} <= logged
    code, answer, stderr = await run_cli(p, tmp_path)
    assert code == 0 and answer["ok"] is True, (answer, stderr)


async def test_erasing_a_consumer_whose_key_is_already_gone_still_records_it(
    platform: Platform, rng: random.Random
) -> None:
    """A key destroyed outside the RPC (an operator at the database, as test_personal_data
    does) leaves the consumer unerased on record: EraseConsumer records it then, once."""
    p = platform
    _, consumer = await p.person(rng)
    store = p.running["eligibility"].runtime.store
    async with store.transaction() as tx:
        await tx.conn.execute(
            text("DELETE FROM person_keys WHERE consumer_id = :c"), {"c": consumer}
        )
    await erase(p, consumer, "purpose ended")
    assert await refused(p, consumer, "purpose ended") == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONSUMER_ERASED",
        "consumer_id",
    )
