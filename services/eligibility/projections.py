"""Eligibility read models fed by events: consumers, qualifications, daily quotas, policies,
and persons (every consumer's identifiers as blind indexes, who is one person, erasures).

``person_keys`` is not a read model: it holds each person's wrapped data key. Deleting a row
crypto-shreds that person; the events keep only ciphertext, so the log stays verifiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import EventStore
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain, linking

metadata = MetaData()
ONE_QUALIFICATION_PER_ORDER = "qualifications_one_per_order"

consumers = Table(
    "consumers",
    metadata,
    Column("consumer_id", String(64), primary_key=True),
    Column("id_number_index", String(128), nullable=False, unique=True),
    Column("phone_index", String(128), nullable=False, index=True),
    Column("id_number_masked", String(32), nullable=False),
    Column("phone_masked", String(32), nullable=False),
    Column("platform_id", String(64), nullable=False),
)
# Which platforms may serve a consumer: the one that registered them, and every platform the
# same person registered through since (ConsumerEnrolled).
consumer_platforms = Table(
    "consumer_platforms",
    metadata,
    Column("consumer_id", String(64), primary_key=True),
    Column("platform_id", String(64), primary_key=True),
)
# Failed three-factor checks per ID number (blind index) and day: what the attempt limit counts.
identity_failures = Table(
    "identity_failures",
    metadata,
    Column("id_number_index", String(128), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("failures", BigInteger, nullable=False),
)
person_keys = Table(
    "person_keys",
    metadata,
    Column("consumer_id", String(64), primary_key=True),
    Column("wrapped_key", Text, nullable=False),
)
qualifications = Table(
    "qualifications",
    metadata,
    Column("qualification_id", String(64), primary_key=True),
    Column("consumer_id", String(64), nullable=False),
    Column("category", String(64), nullable=False),
    Column("channel", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("order_id", String(64), nullable=False),
    Column("quota_day", String(10), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("qualifications_by_consumer", "consumer_id", "category"),
    Index("qualifications_by_order", "order_id"),
    # What the expiry sweeper looks for: available ones, by expiry.
    Index("qualifications_due", "expires_at", postgresql_where=text("status = 'AVAILABLE'")),
    # One qualification per order: a second lock to an order that holds one is refused here,
    # under concurrency, so the ledger's events always name one qualification.
    Index(
        ONE_QUALIFICATION_PER_ORDER,
        "order_id",
        unique=True,
        postgresql_where=text("status IN ('LOCKED', 'USED')"),
    ),
)
# When a qualification restored "next day" by a refund may be locked again. Its own table, not a
# column of ``qualifications``: a table is what the schema step (create_all) adds to an existing
# database; schema migrations proper are issue 15's.
qualification_availability = Table(
    "qualification_availability",
    metadata,
    Column("qualification_id", String(64), primary_key=True),
    Column("available_from", DateTime(timezone=True), nullable=False),
)
quota_usage = Table(
    "quota_usage",
    metadata,
    Column("category", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("issued", BigInteger, nullable=False),
)
# -- persons (same user): services/eligibility/linking.py decides, services/eligibility/persons.py
# reads. Every identifier of every consumer as a blind index in its identifier space, with a mask.
consumer_identifiers = Table(
    "consumer_identifiers",
    metadata,
    Column("space", String(32), primary_key=True),
    Column("blind_index", String(128), primary_key=True),
    Column("consumer_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("masked", String(64), nullable=False),  # emptied when the consumer is erased
    Index("consumer_identifiers_by_consumer", "consumer_id"),
)
# One row per person: the row a claim locks, so claims of linked consumers serialise; a merge
# deletes the rows of the persons it absorbs (a claim waiting on one then looks again).
persons = Table(
    "persons",
    metadata,
    Column("person_id", String(64), primary_key=True),
    Column("consumers", BigInteger, nullable=False),
    # When its consumers were last linked (what person_held_when_linked records is from then).
    Column("linked_at", DateTime(timezone=True)),
)
person_members = Table(
    "person_members",
    metadata,
    Column("consumer_id", String(64), primary_key=True),
    Column("person_id", String(64), nullable=False, index=True),
)
# Per person and category, what its consumers held together when they were last linked
# (ConsumersLinked.held): claims made before a link may exceed a limit, and stay.
person_held_when_linked = Table(
    "person_held_when_linked",
    metadata,
    Column("person_id", String(64), primary_key=True),
    Column("category", String(64), primary_key=True),
    Column("held", BigInteger, nullable=False),
)
consumer_erasures = Table(
    "consumer_erasures",
    metadata,
    Column("consumer_id", String(64), primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False),
)
PERSON_TABLES = (
    consumer_identifiers,
    persons,
    person_members,
    person_held_when_linked,
    consumer_erasures,
)
policies = Table(
    "policies",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
)

QUALIFICATION_EVENTS = (
    ev.QualificationLocked,
    ev.QualificationUsed,
    ev.QualificationUnlocked,
    ev.QualificationRestored,
    ev.QualificationForfeited,
    ev.QualificationExpired,
)
PERSON_EVENTS = (ev.IdentifiersAdded, ev.ConsumersLinked, ev.ConsumerErased)


def consumer_stream(consumer_id: str) -> str:
    """A consumer's stream: their registration and every qualification they claim."""
    return f"consumer/{consumer_id}"


def as_qualification(row: Any, available_from: Any = None) -> domain.Qualification:
    return domain.Qualification(
        qualification_id=row.qualification_id,
        consumer_id=row.consumer_id,
        category=row.category,
        channel=row.channel,
        status=row.status,
        order_id=row.order_id,
        quota_day=row.quota_day,
        expires_at=row.expires_at,
        available_from=available_from,
    )


# The qualification hot path's statements (LockQualification, the ledger's outcomes, reads),
# compiled once and run prepared (services/kernel/sql.py).
_QUALIFICATION_ROW = select(
    qualifications, qualification_availability.c.available_from
).select_from(
    qualifications.outerjoin(
        qualification_availability,
        qualification_availability.c.qualification_id == qualifications.c.qualification_id,
    )
)
_QUALIFICATION = Statement(
    _QUALIFICATION_ROW.where(qualifications.c.qualification_id == bindparam("qid")),
    name="load_qualification",
)
_QUALIFICATIONS_ANY = Statement(
    _QUALIFICATION_ROW.where(
        qualifications.c.qualification_id == any_(bindparam("qids", type_=ARRAY(String())))
    ),
    name="load_qualifications_any",
)
_SET_QUALIFICATION = Statement(
    update(qualifications)
    .where(qualifications.c.qualification_id == bindparam("qid"))
    .values(
        status=bindparam("new_status"),
        order_id=bindparam("new_order_id"),
        expires_at=bindparam("new_expires_at"),
    ),
    name="set_qualification",
)
_SET_AVAILABLE_FROM = Statement(
    pg_insert(qualification_availability)
    .values(qualification_id=bindparam("qid"), available_from=bindparam("at"))
    .on_conflict_do_update(
        index_elements=["qualification_id"], set_={"available_from": bindparam("at")}
    ),
    name="set_available_from",
)


async def load_qualification(conn: AsyncConnection, qid: str) -> domain.Qualification | None:
    """One qualification as the read model holds it (None if there is none)."""
    row = await _QUALIFICATION.first(conn, qid=qid)
    return as_qualification(row, row.available_from) if row is not None else None


async def load_qualifications(
    conn: AsyncConnection, qids: Sequence[str]
) -> dict[str, domain.Qualification]:
    """:func:`load_qualification` for many, in one statement (the ones there are)."""
    rows = await _QUALIFICATIONS_ANY.all(conn, qids=sorted(set(qids)))
    return {r.qualification_id: as_qualification(r, r.available_from) for r in rows}


async def apply_event(
    conn: AsyncConnection,
    env: Envelope,
    known: dict[str, domain.Qualification] | None = None,
) -> None:
    """Apply one eligibility event to the read models; a qualification's status comes from
    :func:`services.eligibility.domain.evolve`, never decided here.

    ``known``: qualifications as the read model holds them in this transaction (the state a
    decision was just made on, under its stream's lock), so a qualification event is applied
    without reading its row again; each one applied is recorded there as the row now is."""
    event = payload_of(env)
    if isinstance(event, ev.ConsumerRegistered):
        await apply_person_event(conn, env, event)
        await conn.execute(
            insert(consumers).values(
                consumer_id=event.consumer_id,
                id_number_index=event.id_number_index,
                phone_index=event.phone_index,
                id_number_masked=event.id_number_masked,
                phone_masked=event.phone_masked,
                platform_id=event.platform_id,
            )
        )
        await conn.execute(
            insert(consumer_platforms).values(
                consumer_id=event.consumer_id, platform_id=event.platform_id
            )
        )
    elif isinstance(event, ev.IdentityCheckFailed):
        stmt = pg_insert(identity_failures).values(
            id_number_index=event.id_number_index, day=event.day, failures=1
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["id_number_index", "day"],
                set_={"failures": identity_failures.c.failures + 1},
            )
        )
    elif isinstance(event, ev.ConsumerEnrolled):
        await conn.execute(
            insert(consumer_platforms).values(
                consumer_id=event.consumer_id, platform_id=event.platform_id
            )
        )
    elif isinstance(event, ev.QualificationClaimed):
        await _claimed(conn, [event])
    elif isinstance(event, PERSON_EVENTS):
        await apply_person_event(conn, env, event)
    elif isinstance(event, QUALIFICATION_EVENTS):
        qid = event.qualification_id
        before = (
            known[qid]
            if known is not None and qid in known
            else await load_qualification(conn, qid)
        )
        after = domain.evolve(before, event)
        if after is not None:
            await _SET_QUALIFICATION.run(
                conn,
                qid=qid,
                new_status=after.status,
                new_order_id=after.order_id,
                new_expires_at=after.expires_at,
            )
            if after.available_from is not None:
                await _SET_AVAILABLE_FROM.run(conn, qid=qid, at=after.available_from)
            elif before is not None and before.available_from is not None:
                # No new date: the row keeps the one it had, and so does what is known.
                after = replace(after, available_from=before.available_from)
            if known is not None:
                known[qid] = after


async def apply_person_event(conn: AsyncConnection, env: Envelope, event: Message) -> None:
    """The persons read models (identifiers, persons, erasures) after one event.

    Whether two persons merge is decided by services/eligibility/linking.py; applying a link
    here does not depend on the order links arrive in, so a replay gives the same rows although
    the store's global order may put a link before an event it was decided after (a transaction
    that waited on another's lock can hold the older transaction id): membership is the union of
    the linked pairs, a person's id comes from its consumers, and what a person held when linked
    is the latest link's (by the time it was decided)."""
    if isinstance(event, ev.ConsumerRegistered):
        # The ID number and the registered phone are identifiers too.
        await _add_identifiers(
            conn,
            event.consumer_id,
            [
                (linking.Kind.ID_NUMBER, event.id_number_index, event.id_number_masked),
                (linking.Kind.PHONE, event.phone_index, event.phone_masked),
            ],
        )
        await _person_row(conn, event.consumer_id)
    elif isinstance(event, ev.IdentifiersAdded):
        await _add_identifiers(
            conn,
            event.consumer_id,
            [(linking.Kind(i.kind), i.blind_index, i.masked) for i in event.identifiers],
        )
    elif isinstance(event, ev.ConsumersLinked):
        await _link(
            conn,
            event.consumer_id,
            event.linked_consumer_id,
            env.occurred_at.ToDatetime(tzinfo=UTC),
            {h.category: int(h.count) for h in event.held},
        )
    elif isinstance(event, ev.ConsumerErased):
        # The key is gone (persons.py); what stays is what limits need: blind indexes, the
        # person, the qualifications. Masks go, and no platform may act for them any more.
        c = event.consumer_id
        await conn.execute(
            insert(consumer_erasures).values(
                consumer_id=c, erased_at=env.occurred_at.ToDatetime(tzinfo=UTC)
            )
        )
        await conn.execute(delete(consumer_platforms).where(consumer_platforms.c.consumer_id == c))
        await conn.execute(
            update(consumers)
            .where(consumers.c.consumer_id == c)
            .values(id_number_masked="", phone_masked="")
        )
        await conn.execute(
            update(consumer_identifiers)
            .where(consumer_identifiers.c.consumer_id == c)
            .values(masked="")
        )


async def _add_identifiers(
    conn: AsyncConnection, consumer_id: str, found: list[tuple[linking.Kind, str, str]]
) -> None:
    await conn.execute(
        pg_insert(consumer_identifiers)
        .values(
            [
                {
                    "space": linking.space(kind),
                    "blind_index": index,
                    "consumer_id": consumer_id,
                    "kind": kind,
                    "masked": masked,
                }
                for kind, index, masked in found
            ]
        )
        .on_conflict_do_nothing()
    )


async def _person_row(conn: AsyncConnection, consumer_id: str) -> str:
    """The consumer's person; a consumer nobody has linked yet is a person of their own."""
    person: str | None = await conn.scalar(
        select(person_members.c.person_id).where(person_members.c.consumer_id == consumer_id)
    )
    if person is None:
        person = linking.person_id([consumer_id])
        await conn.execute(insert(persons).values(person_id=person, consumers=1))
        await conn.execute(insert(person_members).values(consumer_id=consumer_id, person_id=person))
    return person


async def _link(
    conn: AsyncConnection,
    a: str,
    b: str,
    linked_at: datetime,
    held: dict[str, int],
) -> None:
    """Merge the persons of ``a`` and ``b`` (one already: only the held record may change)."""
    merged = sorted({await _person_row(conn, a), await _person_row(conn, b)})
    earlier = (await conn.execute(select(persons).where(persons.c.person_id.in_(merged)))).all()
    members = list(
        (
            await conn.execute(
                select(person_members.c.consumer_id).where(person_members.c.person_id.in_(merged))
            )
        ).scalars()
    )
    person = linking.person_id(members)
    # The latest link's record wins (a person's record is that of the link that made it).
    latest = max((r.linked_at for r in earlier if r.linked_at is not None), default=None)
    if latest is not None and latest > linked_at:
        kept = await conn.execute(
            select(person_held_when_linked).where(
                person_held_when_linked.c.person_id
                == next(r.person_id for r in earlier if r.linked_at == latest)
            )
        )
        held, linked_at = {r.category: int(r.held) for r in kept}, latest
    await conn.execute(
        update(person_members)
        .where(person_members.c.person_id.in_(merged))
        .values(person_id=person)
    )
    # The absorbed persons' rows go (a claim waiting on one looks again); the survivor's stays.
    await conn.execute(
        delete(persons).where(persons.c.person_id.in_(merged), persons.c.person_id != person)
    )
    await conn.execute(
        pg_insert(persons)
        .values(person_id=person, consumers=len(members), linked_at=linked_at)
        .on_conflict_do_update(
            index_elements=["person_id"],
            set_={"consumers": len(members), "linked_at": linked_at},
        )
    )
    await conn.execute(
        delete(person_held_when_linked).where(
            person_held_when_linked.c.person_id.in_([*merged, person])
        )
    )
    if held:
        await conn.execute(
            insert(person_held_when_linked),
            [{"person_id": person, "category": c, "held": n} for c, n in sorted(held.items())],
        )


async def apply_events(conn: AsyncConnection, envs: Sequence[Envelope]) -> None:
    """:func:`apply_event` for many envelopes, in order (the pipeline's ``run_many``): a run of
    QualificationClaimed, as a claim batch appends, in two statements, its rows from
    ``domain.evolve`` as one at a time."""
    claimed: list[ev.QualificationClaimed] = []
    for env in envs:
        event = payload_of(env)
        if isinstance(event, ev.QualificationClaimed):
            claimed.append(event)
            continue
        await _claimed(conn, claimed)
        claimed = []
        await apply_event(conn, env)
    await _claimed(conn, claimed)


# What claims write: the new qualifications in one statement (arrays unnested in step, one
# row per claim), and each day's counter moved by the claims of the batch. Compiled once.
_CLAIMED_COLUMNS = (
    "qualification_id",
    "consumer_id",
    "category",
    "channel",
    "status",
    "order_id",
    "quota_day",
)
_INSERT_CLAIMED = Statement(
    insert(qualifications).from_select(
        [*_CLAIMED_COLUMNS, "expires_at"],
        select(
            *(func.unnest(bindparam(c, type_=ARRAY(String()))).label(c) for c in _CLAIMED_COLUMNS),
            func.unnest(bindparam("expires_at", type_=ARRAY(DateTime(timezone=True)))).label(
                "expires_at"
            ),
        ),
    ),
    name="insert_claimed",
)
_quota_claimed = pg_insert(quota_usage).values(
    category=bindparam("category"), day=bindparam("day"), issued=bindparam("n")
)
_COUNT_CLAIMED = Statement(
    _quota_claimed.on_conflict_do_update(
        index_elements=["category", "day"],
        set_={"issued": quota_usage.c.issued + _quota_claimed.excluded.issued},
    ),
    name="count_claimed",
)


async def _claimed(conn: AsyncConnection, events: Sequence[ev.QualificationClaimed]) -> None:
    if not events:
        return
    columns: dict[str, list[Any]] = {c: [] for c in (*_CLAIMED_COLUMNS, "expires_at")}
    per_day: dict[tuple[str, str], int] = {}
    for event in events:
        claimed = domain.evolve(None, event)
        assert claimed is not None
        row = asdict(claimed)
        del row["available_from"]  # a fresh claim is lockable at once (its own table)
        for c, values in columns.items():
            values.append(row[c])
        group = (event.category, event.quota_day)
        per_day[group] = per_day.get(group, 0) + 1
    await _INSERT_CLAIMED.run(conn, **columns)
    for (category, day), n in sorted(per_day.items()):
        await _COUNT_CLAIMED.run(conn, category=category, day=day, n=n)


async def rebuild(store: EventStore) -> int:
    """Drop the read models and replay every event; returns how many were applied.

    Only the read models of this service's own events are rebuilt: ``person_keys`` holds each
    person's wrapped data key (deleting a row shreds that person, so it is never recreated) and
    ``policies`` is a copy of catalog's documents, fed by catalog's events. Run it with the
    service quiesced: a consumer handling an event meanwhile would update rows being replaced.
    """
    return await store.rebuild(
        (
            qualification_availability,
            qualifications,
            quota_usage,
            consumer_platforms,
            identity_failures,
            consumers,
            *PERSON_TABLES,
        ),
        apply_event,
    )
