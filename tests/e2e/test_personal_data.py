"""No raw personal data anywhere; masked forms where people look; crypto-shredding works.

A few generated people register (and fail to, in ways that carry their data), one checks out;
then every row of every table of the eligibility, ledger and audit databases, every event
envelope of every service, every JetStream message on ``events.>``, every log record of the
calls and every finished span is searched for their raw ID numbers, phones and names. The
scanner is shown to see each source (the masked forms and consumer ids are found), so an empty
result means something. Finally one person is shredded: their data can no longer be revealed,
and the audit log still verifies.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import psycopg
import pytest
from nats.js.api import DeliverPolicy
from psycopg import sql
from sqlalchemy import text

from services.audit import log as audit_log
from services.audit.verify import replay
from services.eligibility.handlers import Eligibility
from services.kernel import bus
from services.kernel.bus import EVENTS_STREAM
from services.kernel.errors import NotFound
from subsidy.v1 import eligibility_pb2, identity_pb2, ledger_pb2
from subsidyctl.demo import IN_REGION
from tests.e2e.conftest import Platform, eventually, status_of
from tests.support.identities import Person, make_person, make_phone

SCANNED_DATABASES = ("eligibility", "ledger", "audit")


@dataclass(frozen=True)
class Found:
    """One place a needle was seen."""

    source: str  # e.g. "db:eligibility.consumers", "nats:events.eligibility.ConsumerRegistered"
    needle: str


class Corpus:
    """Everything the system stored, published, logged or traced, searchable as text and bytes."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def add(self, source: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, memoryview):
            value = value.tobytes()
        if isinstance(value, bytes | bytearray):
            raw = bytes(value)
            # The bytes as they are, and decoded ignoring what is not UTF-8 (so a needle split
            # by stray bytes in a binary column is still found).
            self.items.append((source, raw))
            self.items.append((source, raw.decode("utf-8", errors="ignore").encode()))
        else:
            self.items.append((source, str(value).encode()))

    def find(self, needles: Iterable[str]) -> list[Found]:
        hits: list[Found] = []
        for needle in needles:
            encoded = needle.encode()
            hits += [Found(source, needle) for source, data in self.items if encoded in data]
        return hits

    def sources(self, prefix: str) -> int:
        return sum(1 for source, _ in self.items if source.startswith(prefix))


def sensitive(person: Person) -> list[str]:
    """What must never appear: the raw values, and the parts masking hides."""
    return [
        person.id_number,
        person.id_number[6:17],  # birth date and sequence: hidden by the mask
        person.phone,
        person.phone[3:],  # the hidden middle digits with the last four
        person.name,
    ]


def id_masked(person: Person) -> str:
    return person.id_number[:4] + "*" * 10 + person.id_number[-4:]


def phone_masked(person: Person) -> str:
    return person.phone[:3] + "****" + person.phone[-4:]


def three_character_person(rng: random.Random) -> Person:
    """A person whose name (three characters) cannot turn up by coincidence in policy text."""
    while len((person := make_person(rng)).name) != 3:
        pass
    return person


def libpq_url(platform: Platform, service: str) -> str:
    url = platform.running[service].runtime.settings.database_url
    return url.replace("postgresql+psycopg://", "postgresql://")


async def scan_databases(platform: Platform, corpus: Corpus) -> None:
    for service in SCANNED_DATABASES:
        async with await psycopg.AsyncConnection.connect(libpq_url(platform, service)) as db:
            tables = await (
                await db.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
                )
            ).fetchall()
            assert tables, f"no tables in the {service} database"
            for (table,) in tables:
                cursor = await db.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
                for row in await cursor.fetchall():
                    for value in row:
                        corpus.add(f"db:{service}.{table}", value)


async def scan_event_stores(platform: Platform, corpus: Corpus) -> None:
    for service, running in platform.running.items():
        for rec in await running.runtime.store.read_all(limit=1_000_000):
            corpus.add(f"events:{service}", rec.envelope.SerializeToString())


async def scan_jetstream(platform: Platform, corpus: Corpus) -> int:
    nc, js = await bus.connect(platform.nats_url, "scan", platform.nats_operator)
    try:
        expected = (await js.stream_info(EVENTS_STREAM)).state.messages
        sub = await js.subscribe(
            "events.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        for _ in range(expected):
            msg = await sub.next_msg(timeout=10)
            corpus.add(f"nats:{msg.subject}", msg.data)
            corpus.add(f"nats-headers:{msg.subject}", repr(msg.headers))
        await sub.unsubscribe()
        return expected
    finally:
        await nc.close()


def scan_logs(records: Iterable[logging.LogRecord], corpus: Corpus) -> None:
    formatter = logging.Formatter()
    for record in records:
        corpus.add(f"log:{record.name}", record.getMessage())
        corpus.add(f"log:{record.name}", repr(record.__dict__))
        if record.exc_info:
            corpus.add(f"log:{record.name}", formatter.formatException(record.exc_info))


def scan_spans(platform: Platform, corpus: Corpus) -> None:
    for span in platform.spans.get_finished_spans():
        corpus.add(f"span:{span.name}", span.to_json())


async def audit_caught_up(platform: Platform) -> None:
    async def check() -> None:
        total = sum([await r.runtime.store.count() for r in platform.running.values()])
        size, _, _ = await audit_log.info(platform.running["audit"].runtime.store)
        assert size == total

    await eventually(check)


def eligibility_of(platform: Platform) -> Eligibility:
    e = platform.running["eligibility"].wiring.registrations[0][1].e
    assert isinstance(e, Eligibility)
    return e


async def register(platform: Platform, person: Person, phone: str | None = None) -> str:
    c = await platform.eligibility.RegisterConsumer(
        eligibility_pb2.RegisterConsumerRequest(
            name=person.name,
            id_number=person.id_number,
            phone=phone or person.phone,
            platform_id="jd",
        )
    )
    return c.consumer_id


async def test_no_raw_personal_data_anywhere_and_shredding(
    platform: Platform, rng: random.Random, caplog: pytest.LogCaptureFixture
) -> None:
    p = platform
    # DEBUG includes every INFO record; at INFO alone the services log nothing on these paths,
    # so the log scan would prove nothing. DEBUG adds gRPC's and the Vault client's records.
    caplog.set_level(logging.DEBUG)
    people = [three_character_person(rng) for _ in range(3)]
    consumers: list[str] = []
    for person in people:
        await p.authority.Enroll(
            identity_pb2.EnrollRequest(
                name=person.name, id_number=person.id_number, phone=person.phone
            )
        )
        consumers.append(await register(p, person))
        again = await p.eligibility.RegisterConsumer(  # the same person, in +86 form
            eligibility_pb2.RegisterConsumerRequest(
                name=person.name,
                id_number=person.id_number.lower(),
                phone=f"+86 {person.phone}",
                platform_id="jd",
            )
        )
        assert (again.consumer_id, again.already_registered) == (consumers[-1], True)
        assert (again.id_number_masked, again.phone_masked) == (
            id_masked(person),
            phone_masked(person),
        )

    # Refusals that carry the people's data: their errors must not echo it either.
    while (wrong_phone := make_phone(rng)) == people[1].phone:
        pass
    for bad in (
        eligibility_pb2.RegisterConsumerRequest(
            name=people[1].name,
            id_number=people[1].id_number,
            phone=wrong_phone,
            platform_id="jd",
        ),
        eligibility_pb2.RegisterConsumerRequest(
            name=people[2].name,
            id_number=people[1].id_number,
            phone=people[1].phone,
            platform_id="jd",
        ),
        eligibility_pb2.RegisterConsumerRequest(
            name=people[2].name,
            id_number=people[2].id_number[:17] + "?",
            phone=people[2].phone,
            platform_id="jd",
        ),
        eligibility_pb2.RegisterConsumerRequest(
            name=people[2].name,
            id_number=people[2].id_number,
            phone=people[2].phone + "9",
            platform_id="jd",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.eligibility.RegisterConsumer(bad)
        assert status_of(err.value)[0] in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        corpus_of_error = Corpus()
        corpus_of_error.add("error", err.value.details())
        corpus_of_error.add("error", repr(err.value.trailing_metadata()))
        assert corpus_of_error.find(n for person in people for n in sensitive(person)) == []

    # One checkout, paid and then refunded.
    sku = await p.product(rng, "phone", 0, 300_000)
    pool = await p.pool(rng, 1_000_000)
    q = await p.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            circumstances=IN_REGION, consumer_id=consumers[0], category="phone", channel="jd"
        )
    )
    order = f"o-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=order,
            platform_id="jd",
            pool_id=pool,
            consumer_id=consumers[0],
            qualification_id=q.qualification_id,
            sku=sku,
            unit_price_fen=300_000,
            serial=f"IMEI{rng.randrange(10**15):015d}",
        )
    )
    await p.ledger.CaptureSubsidy(
        ledger_pb2.CaptureSubsidyRequest(order_id=order, payment_ref="w1")
    )
    await p.ledger.ReleaseSubsidy(
        ledger_pb2.ReleaseSubsidyRequest(order_id=order, reason="REFUNDED")
    )
    await audit_caught_up(p)

    corpus = Corpus()
    await scan_databases(p, corpus)
    await scan_event_stores(p, corpus)
    published = await scan_jetstream(p, corpus)
    scan_logs(caplog.records, corpus)
    scan_spans(p, corpus)

    # The scanner sees every source: ...
    assert published > 0 and corpus.sources("nats:") == 2 * published
    assert corpus.sources("span:") > 0
    assert corpus.sources("log:") > 0
    for c in consumers:
        seen_in = {f.source.split(".")[0] for f in corpus.find([c])}
        assert {"db:eligibility", "db:audit", "events:eligibility", "nats:events"} <= seen_in
    # ... the masked forms are where people look: the consumers read model ...
    async with p.running["eligibility"].runtime.store.engine.connect() as conn:
        rows = {
            r.consumer_id: (r.id_number_masked, r.phone_masked)
            for r in await conn.execute(
                text("SELECT consumer_id, id_number_masked, phone_masked FROM consumers")
            )
        }
    for person, c in zip(people, consumers, strict=True):
        assert rows[c] == (id_masked(person), phone_masked(person))
        masked_in = {f.source for f in corpus.find([id_masked(person), phone_masked(person)])}
        assert "db:eligibility.consumers" in masked_in
    # ... and the raw values are nowhere.
    assert corpus.find(n for person in people for n in sensitive(person)) == []

    # Only Eligibility.reveal, with the person's own key, gives the data back.
    e = eligibility_of(p)
    for person, c in zip(people, consumers, strict=True):
        assert await e.reveal(c) == {
            "name": person.name,
            "id_number": person.id_number,
            "phone": person.phone,
        }

    # Crypto-shredding: destroy the person's wrapped key.
    shredded = consumers[1]
    async with p.running["eligibility"].runtime.store.transaction() as tx:
        deleted = await tx.conn.execute(
            text("DELETE FROM person_keys WHERE consumer_id = :c"), {"c": shredded}
        )
        assert deleted.rowcount == 1
    with pytest.raises(NotFound) as gone:
        await e.reveal(shredded)
    assert gone.value.reason == "PERSON_SHREDDED"
    assert await e.reveal(consumers[0]) == {  # the others are untouched
        "name": people[0].name,
        "id_number": people[0].id_number,
        "phone": people[0].phone,
    }

    # The audit log still verifies end to end, and still holds the shredded person's events.
    audit_store = p.running["audit"].runtime.store
    size, head, _ = await audit_log.info(audit_store)
    entries = await audit_log.read(audit_store, 0, size + 1)
    assert len(entries) == size
    assert replay(entries).head == head
    assert any(shredded.encode() in data for _, _, _, data in entries)
