"""Same user on the real stack, over gRPC: consumers that share any identifier (ID number,
registered phone, bank phone, bank card, device, app account), directly or through a chain, are
one person for every limit, across platforms; claims by linked consumers serialise on their
person, also while a merge is committing; an operator sees which identifier (masked) linked whom.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from services.eligibility import projections
from services.eligibility.handlers import Eligibility
from services.eligibility.linking import Kind
from services.kernel import rpc
from services.kernel.events import payload_of
from services.kernel.eventstore import EventStore
from services.kernel.identity import Caller, Role
from subsidy.v1 import common_pb2, eligibility_pb2, eligibility_pb2_grpc, identity_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_personal_data import Corpus, scan_databases, scan_event_stores
from tests.support.identities import make_person

PERSON_TABLES = tuple(t.name for t in projections.PERSON_TABLES)
# Every raw identifier a test here sends: none may be stored, published or logged.
SENT: list[str] = []


async def rows(store: EventStore, tables: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each table, sorted (whole rows: several share their first columns)."""
    async with store.engine.connect() as conn:
        return {
            t: sorted(tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t}")))
            for t in tables
        }


def device(rng: random.Random) -> str:
    value = f"dev-{rng.randrange(16**12):012x}"
    SENT.append(value)
    return value


def card(rng: random.Random) -> str:
    value = "62" + "".join(rng.choice("0123456789") for _ in range(14))
    SENT.extend((value, value[:-4]))  # the hidden digits too
    return value


def account(rng: random.Random) -> str:
    value = f"acct-{rng.randrange(10**12)}"
    SENT.append(value)
    return value


async def register(
    p: Platform,
    rng: random.Random,
    *,
    platform_id: str = "jd",
    phone: str = "",
    **identifiers: str,
) -> str:
    """A new person, enrolled at the authority and registered with ``identifiers``."""
    person = make_person(rng)
    phone = phone or person.phone
    await p.authority.Enroll(
        identity_pb2.EnrollRequest(name=person.name, id_number=person.id_number, phone=phone)
    )
    c = await p.eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=person.name,
            id_number=person.id_number,
            phone=phone,
            platform_id=platform_id,
            identifiers=eligibility_pb2.Identifiers(**identifiers),
        )
    )
    assert not c.already_registered
    return str(c.consumer_id)


async def add(p: Platform, consumer: str, platform_id: str = "jd", **identifiers: str) -> None:
    await p.eligibility.AddIdentifiers(
        eligibility_pb2.AddIdentifiersRequest(
            consumer_id=consumer,
            platform_id=platform_id,
            identifiers=eligibility_pb2.Identifiers(**identifiers),
        )
    )


async def person(p: Platform, consumer: str) -> eligibility_pb2.Person:
    return await p.eligibility.GetPerson(eligibility_pb2.GetPersonRequest(consumer_id=consumer))


async def refused_claim(p: Platform, consumer: str, category: str = "phone") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.claim(consumer, category)
    code, reason, _ = status_of(err.value)
    return f"{code.name}/{reason}"


def eligibility_of(p: Platform) -> Eligibility:
    e = p.running["eligibility"].wiring.registrations[0][1].e
    assert isinstance(e, Eligibility)
    return e


async def test_two_consumers_sharing_a_device_are_one_person_for_the_limit(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    shared = device(rng)
    a = await register(p, rng, device_id=shared)
    b = await register(p, rng, device_id=shared)
    await p.claim(a, "phone")
    assert await refused_claim(p, b) == "RESOURCE_EXHAUSTED/PERSON_LIMIT_REACHED"
    # Another category is a limit of its own; a consumer sharing nothing is a person of their own.
    await p.claim(b, "refrigerator")
    loner = await register(p, rng, device_id=device(rng))
    await p.claim(loner, "phone")

    found = await person(p, b)
    assert found == await person(p, a)
    assert [c.consumer_id for c in found.consumers] == sorted([a, b])
    assert [
        (lk.consumer_id, lk.kind, lk.linked_consumer_id, lk.linked_kind) for lk in found.links
    ] == [(min(a, b), "DEVICE", max(a, b), "DEVICE")]
    assert found.links[0].masked == f"{shared[:2]}***{shared[-2:]}"
    assert [c.consumer_id for c in (await person(p, loner)).consumers] == [loner]


async def test_a_chain_of_shared_identifiers_is_one_person_across_platforms(
    platform: Platform, rng: random.Random
) -> None:
    """A shares a device with B (both at jd); C (at taobao) has a card that B's platform adds
    to B later: A, B and C are one person; D, sharing nothing, is not."""
    p = platform
    shared_device, shared_card = device(rng), card(rng)
    a = await register(p, rng, device_id=shared_device)
    b = await register(p, rng, device_id=shared_device)
    c = await register(p, rng, platform_id="taobao", bank_card=shared_card)
    d = await register(p, rng, bank_card=card(rng))
    await p.claim(c, "phone", channel="taobao")
    await p.claim(a, "tablet")  # before B and C are linked: B's tablet is still allowed ...
    await add(p, b, bank_card=shared_card)
    assert await refused_claim(p, a) == "RESOURCE_EXHAUSTED/PERSON_LIMIT_REACHED"
    assert await refused_claim(p, b) == "RESOURCE_EXHAUSTED/PERSON_LIMIT_REACHED"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # ... but A's tablet now counts for C
        await p.claim(c, "tablet", channel="taobao")
    assert status_of(err.value)[1] == "PERSON_LIMIT_REACHED"
    await p.claim(d, "phone")

    found = await person(p, c)
    assert sorted(x.consumer_id for x in found.consumers) == sorted([a, b, c])
    kinds = {
        (lk.kind, lk.linked_kind, frozenset((lk.consumer_id, lk.linked_consumer_id)))
        for lk in found.links
    }
    assert kinds == {
        ("DEVICE", "DEVICE", frozenset((a, b))),
        ("BANK_CARD", "BANK_CARD", frozenset((b, c))),
    }
    assert {lk.masked for lk in found.links if lk.kind == "BANK_CARD"} == {
        f"****{shared_card[-4:]}"
    }
    assert {tuple(x.platform_ids) for x in found.consumers} == {("jd",), ("taobao",)}


async def test_a_phone_registered_by_one_and_bank_reserved_by_another_links_them(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    a = await register(p, rng)
    phone = make_person(rng).phone
    SENT.extend((phone, phone[3:]))
    b = await register(p, rng, bank_phone=phone)
    c = await register(p, rng, phone=phone)  # C's registered phone is B's bank phone
    assert [x.consumer_id for x in (await person(p, a)).consumers] == [a]
    found = await person(p, c)
    assert sorted(x.consumer_id for x in found.consumers) == sorted([b, c])
    [link] = found.links
    assert {(link.consumer_id, link.kind), (link.linked_consumer_id, link.linked_kind)} == {
        (b, "BANK_PHONE"),
        (c, "PHONE"),
    }
    assert link.masked == f"{phone[:3]}****{phone[-4:]}"
    await p.claim(b, "smartwatch")
    assert await refused_claim(p, c, "smartwatch") == "RESOURCE_EXHAUSTED/PERSON_LIMIT_REACHED"


async def test_an_app_account_is_one_platforms_own(platform: Platform, rng: random.Random) -> None:
    p = platform
    name = account(rng)
    at_jd = await register(p, rng, app_account=name)
    at_taobao = await register(p, rng, platform_id="taobao", app_account=name)
    again_at_jd = await register(p, rng, app_account=name)
    assert [x.consumer_id for x in (await person(p, at_taobao)).consumers] == [at_taobao]
    assert sorted(x.consumer_id for x in (await person(p, at_jd)).consumers) == sorted(
        [at_jd, again_at_jd]
    )


async def test_a_link_keeps_earlier_claims_and_counts_them_from_then_on(
    platform: Platform, rng: random.Random
) -> None:
    """A and B each claim a phone while unlinked; then a shared device links them. Neither
    qualification is taken back and the log before the link is unchanged; the link records that
    the person held two; a third consumer linked to them can claim no phone."""
    p = platform
    store = p.running["eligibility"].runtime.store
    shared = device(rng)
    a = await register(p, rng, device_id=shared)
    b = await register(p, rng)
    qa, qb = await p.claim(a, "phone"), await p.claim(b, "phone")
    before = await store.read_stream(f"consumer/{b}")
    await add(p, b, device_id=shared)
    after = await store.read_stream(f"consumer/{b}")
    assert [e.SerializeToString() for e in after[: len(before)]] == [
        e.SerializeToString() for e in before
    ]
    added, linked = [payload_of(e) for e in after[len(before) :]]
    assert isinstance(added, ev.IdentifiersAdded) and isinstance(linked, ev.ConsumersLinked)
    assert [i.kind for i in added.identifiers] == ["DEVICE"]
    assert (linked.kind, linked.linked_consumer_id) == ("DEVICE", a)
    assert [(h.category, h.count) for h in linked.held] == [("phone", 2)]
    for qid in (qa, qb):
        q = await p.eligibility.GetQualification(
            eligibility_pb2.GetQualificationRequest(qualification_id=qid)
        )
        assert q.status == "AVAILABLE"
    found = await person(p, a)
    assert [(h.category, h.count) for h in found.held_when_linked] == [("phone", 2)]
    c = await register(p, rng, device_id=shared)
    assert await refused_claim(p, c) == "RESOURCE_EXHAUSTED/PERSON_LIMIT_REACHED"
    await eligibility_of(p).check_limits()  # two phones, recorded by the link: within it


async def test_concurrent_claims_by_linked_consumers_never_exceed_the_limit(
    platform: Platform, rng: random.Random
) -> None:
    """Six consumers linked in a chain (device, card, device, ...), each claiming two air
    conditioners (3 per person) at once: exactly three are issued."""
    p = platform
    consumers = [await register(p, rng, device_id=device(rng))]
    for i in range(5):
        link = {"bank_card": card(rng)} if i % 2 else {"device_id": device(rng)}
        nxt = await register(p, rng, **link)
        await add(p, consumers[-1], **link)
        consumers.append(nxt)
    assert len((await person(p, consumers[0])).consumers) == 6
    results = await asyncio.gather(
        *(p.claim(c, "air_conditioner") for c in consumers for _ in range(2)),
        return_exceptions=True,
    )
    issued = [r for r in results if isinstance(r, str)]
    refused = [status_of(r)[1] for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(issued) == 3, results
    assert refused == ["PERSON_LIMIT_REACHED"] * 9


async def test_concurrent_registrations_with_one_new_device_are_linked(
    platform: Platform, rng: random.Random
) -> None:
    """Two consumers registering at the same moment with the same device: neither sees the
    other's row before it commits, so only the identifier's lock makes the second link."""
    p = platform
    for _ in range(3):
        shared = device(rng)
        a, b = await asyncio.gather(
            register(p, rng, device_id=shared), register(p, rng, device_id=shared)
        )
        assert sorted(x.consumer_id for x in (await person(p, a)).consumers) == sorted([a, b])


@pytest.mark.parametrize("claimer", ["absorbed", "surviving"])
async def test_a_claim_waiting_on_a_person_that_a_merge_changes_counts_the_merged_person(
    platform: Platform, rng: random.Random, claimer: str
) -> None:
    """A claims a phone. A merge of A's person with B's is held open (its transaction has locked
    both persons); B claims meanwhile and waits on its person. When the merge commits, B's claim
    must count A's phone, whether B's person was absorbed (its row deleted: B looks up its person
    again) or survived (B reads the merged membership under the lock)."""
    p = platform
    e = eligibility_of(p)
    store = p.running["eligibility"].runtime.store
    x, y = await register(p, rng), await register(p, rng)
    # The merged person keeps the smallest consumer's id, so the larger one's is absorbed.
    b, a = (max(x, y), min(x, y)) if claimer == "absorbed" else (min(x, y), max(x, y))
    shared = device(rng)
    await add(p, b, device_id=shared)
    await p.claim(a, "phone")
    [ident] = await e.persons.index([(Kind.DEVICE, shared)], "jd")
    actor = common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd")
    async with store.transaction() as tx:
        # A's stream and both persons stay locked until this block ends; B's stream is free.
        await e.persons.identify(a, "jd", [ident], actor, tx=tx)
        claim = asyncio.create_task(p.claim(b, "phone"))

        async def waiting_on_a_lock() -> None:
            async with store.engine.connect() as conn:
                n = await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )
            assert n is not None and n >= 1

        await eventually(waiting_on_a_lock, within=10)
        assert not claim.done()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await claim
    assert status_of(err.value)[1] == "PERSON_LIMIT_REACHED"
    assert sorted(c.consumer_id for c in (await person(p, b)).consumers) == sorted([a, b])


@dataclass
class Refusal:
    request: eligibility_pb2.AddIdentifiersRequest
    code: grpc.StatusCode
    reason: str
    field: str


@pytest.fixture
async def as_jd(
    platform: Platform,
) -> AsyncIterator[eligibility_pb2_grpc.EligibilityServiceAsyncStub]:
    """Eligibility as platform jd, whatever a request names."""
    target = f"127.0.0.1:{platform.running['eligibility'].port}"
    channel = rpc.channel(target, platform.infra.identities(Caller(Role.PLATFORM, "jd")))
    yield eligibility_pb2_grpc.EligibilityServiceStub(channel)
    await channel.close()


async def test_refusals_change_nothing(
    platform: Platform,
    rng: random.Random,
    as_jd: eligibility_pb2_grpc.EligibilityServiceAsyncStub,
) -> None:
    p = platform
    store = p.running["eligibility"].runtime.store
    mine = await register(p, rng)
    theirs = await register(p, rng, platform_id="taobao")
    too_long = "d" * 129
    malformed_card = "6222 0202 00AB 1234"
    SENT.extend((too_long, malformed_card))

    def request(
        consumer: str, platform_id: str = "jd", **identifiers: str
    ) -> eligibility_pb2.AddIdentifiersRequest:
        return eligibility_pb2.AddIdentifiersRequest(
            consumer_id=consumer,
            platform_id=platform_id,
            identifiers=eligibility_pb2.Identifiers(**identifiers),
        )

    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        Refusal(
            request(mine, bank_card=malformed_card),
            bad,
            "BANK_CARD_FORMAT",
            "identifiers.bank_card",
        ),
        Refusal(request(mine, bank_card="1234"), bad, "BANK_CARD_FORMAT", "identifiers.bank_card"),
        Refusal(
            request(mine, device_id=too_long), bad, "DEVICE_ID_FORMAT", "identifiers.device_id"
        ),
        Refusal(
            request(mine, device_id="a b c d"), bad, "DEVICE_ID_FORMAT", "identifiers.device_id"
        ),
        Refusal(
            request(mine, bank_phone="12345678901"), bad, "PHONE_FORMAT", "identifiers.bank_phone"
        ),
        Refusal(
            request(mine, app_account="x"), bad, "APP_ACCOUNT_FORMAT", "identifiers.app_account"
        ),
        Refusal(request(mine), bad, "MISSING_FIELD", "identifiers"),
        Refusal(request("", device_id=device(rng)), bad, "MISSING_FIELD", "consumer_id"),
        # Another platform's consumer is as unknown as one that does not exist ...
        Refusal(
            request(theirs, device_id=device(rng)),
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_CONSUMER",
            "consumer_id",
        ),
        Refusal(
            request("c-nobody", device_id=device(rng)),
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_CONSUMER",
            "consumer_id",
        ),
        # ... and a platform acts for itself only.
        Refusal(
            request(theirs, "taobao", device_id=device(rng)),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_YOUR_PLATFORM",
            "platform_id",
        ),
    ]
    await p.quiesce()
    events_before = await store.count()
    tables_before = await rows(store, PERSON_TABLES)
    for case in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await as_jd.AddIdentifiers(case.request)
        assert status_of(err.value) == (case.code, case.reason, case.field), case
        leaked = Corpus()
        leaked.add("error", err.value.details())
        leaked.add("error", repr(err.value.trailing_metadata()))
        assert leaked.find([too_long, malformed_card, "6222"]) == []
    # Registration validates the identifiers before anyone is asked or anything is stored.
    someone = make_person(rng)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await p.eligibility.RegisterConsumer(
            eligibility_pb2.RegisterConsumerRequest(
                name=someone.name,
                id_number=someone.id_number,
                phone=someone.phone,
                platform_id="jd",
                identifiers=eligibility_pb2.Identifiers(bank_card=malformed_card),
            )
        )
    assert status_of(err.value) == (bad, "BANK_CARD_FORMAT", "identifiers.bank_card")
    # Operators and auditors explain persons; nobody else.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await as_jd.GetPerson(eligibility_pb2.GetPersonRequest(consumer_id=mine))
    assert status_of(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await person(p, "c-nobody")
    assert status_of(err.value)[:2] == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_CONSUMER")
    await p.quiesce()
    assert await store.count() == events_before
    assert await rows(store, PERSON_TABLES) == tables_before
    # Adding what a consumer already has records nothing either.
    known = device(rng)
    await add(p, mine, device_id=known)
    count = await store.count()
    await add(p, mine, device_id=known)
    assert await store.count() == count


async def test_identifiers_are_kept_only_as_blind_indexes_and_masks_and_rebuild_from_events(
    platform: Platform, rng: random.Random
) -> None:
    """After the tests above: no identifier any of them sent is in any row or event (masks and
    blind indexes only), and the persons read models rebuild from the events to the same rows."""
    p = platform
    store = p.running["eligibility"].runtime.store
    if not SENT:  # run alone: make some
        shared = device(rng)
        await register(p, rng, device_id=shared, bank_card=card(rng), app_account=account(rng))
        await register(p, rng, device_id=shared)
    await p.quiesce()
    corpus = Corpus()
    await scan_databases(p, corpus)
    await scan_event_stores(p, corpus)
    assert corpus.sources("db:eligibility.consumer_identifiers") > 0
    assert corpus.find(SENT) == []

    before = await rows(store, PERSON_TABLES)
    assert before["consumer_identifiers"] and before["person_members"]
    async with store.transaction() as tx:  # damage them: the replay must not need them
        await tx.conn.execute(text("DELETE FROM person_members"))
        await tx.conn.execute(text("UPDATE consumer_identifiers SET masked = 'x'"))
    await projections.rebuild(store)
    assert await rows(store, PERSON_TABLES) == before


async def test_the_persons_read_models_do_not_depend_on_the_order_of_streams(
    platform: Platform, rng: random.Random
) -> None:
    """The store's global order follows transaction ids, and a transaction that waited on a lock
    may hold an older one than the transaction it waited for: a link can come before an event it
    was decided after. Applying every stream's events in order, but the streams in the reverse
    order, gives the same persons."""
    p = platform
    store = p.running["eligibility"].runtime.store
    shared, other = device(rng), card(rng)
    a = await register(p, rng, device_id=shared)
    b = await register(p, rng, device_id=shared, bank_card=other)
    await p.claim(a, "phone")
    await register(p, rng, bank_card=other)  # linked to B, so to A: B's person
    operator = common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="ops")
    await eligibility_of(p).persons.erase(b, "test", operator)
    await p.quiesce()
    expected = await rows(store, PERSON_TABLES)
    by_stream: dict[str, list[ev.EventEnvelope]] = {}
    for rec in await store.read_all(limit=10**6):
        by_stream.setdefault(rec.envelope.stream_id, []).append(rec.envelope)
    reordered = [env for stream in reversed(list(by_stream)) for env in by_stream[stream]]
    async with store.engine.connect() as conn:
        t = await conn.begin()
        for table in projections.PERSON_TABLES:
            await conn.execute(table.delete())
        for env in reordered:
            event = payload_of(env)
            if isinstance(event, (ev.ConsumerRegistered, *projections.PERSON_EVENTS)):
                await projections.apply_person_event(conn, env, event)
        replayed = {
            table.name: sorted(tuple(r) for r in await conn.execute(table.select()))
            for table in projections.PERSON_TABLES
        }
        await t.rollback()
    assert replayed == expected
    assert await rows(store, PERSON_TABLES) == expected  # rolled back: nothing changed
