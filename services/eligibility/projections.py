"""Eligibility read models fed by events: consumers, qualifications, daily quotas, policies.

``person_keys`` is not a read model: it holds each person's wrapped data key. Deleting a row
crypto-shreds that person; the events keep only ciphertext, so the log stays verifiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Envelope, payload_of
from services.kernel.eventstore import EventStore
from subsidy.v1 import events_pb2 as ev

from . import domain

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
    # One qualification per order: a second lock to an order that holds one is refused here,
    # under concurrency, so the ledger's events always name one qualification.
    Index(
        ONE_QUALIFICATION_PER_ORDER,
        "order_id",
        unique=True,
        postgresql_where=text("status IN ('LOCKED', 'USED')"),
    ),
)
quota_usage = Table(
    "quota_usage",
    metadata,
    Column("category", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("issued", BigInteger, nullable=False),
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
)


def consumer_stream(consumer_id: str) -> str:
    """A consumer's stream: their registration and every qualification they claim."""
    return f"consumer/{consumer_id}"


def as_qualification(row: Any) -> domain.Qualification:
    return domain.Qualification(
        qualification_id=row.qualification_id,
        consumer_id=row.consumer_id,
        category=row.category,
        channel=row.channel,
        status=row.status,
        order_id=row.order_id,
        quota_day=row.quota_day,
        expires_at=row.expires_at,
    )


async def load_qualification(conn: AsyncConnection, qid: str) -> domain.Qualification | None:
    row = (
        await conn.execute(select(qualifications).where(qualifications.c.qualification_id == qid))
    ).first()
    return as_qualification(row) if row is not None else None


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one eligibility event to the read models; a qualification's status comes from
    :func:`services.eligibility.domain.evolve`, never decided here."""
    event = payload_of(env)
    if isinstance(event, ev.ConsumerRegistered):
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
        claimed = domain.evolve(None, event)
        assert claimed is not None
        await conn.execute(insert(qualifications).values(**asdict(claimed)))
        stmt = pg_insert(quota_usage).values(category=event.category, day=event.quota_day, issued=1)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["category", "day"], set_={"issued": quota_usage.c.issued + 1}
            )
        )
    elif isinstance(event, QUALIFICATION_EVENTS):
        qid = event.qualification_id
        after = domain.evolve(await load_qualification(conn, qid), event)
        if after is not None:
            await conn.execute(
                update(qualifications)
                .where(qualifications.c.qualification_id == qid)
                .values(status=after.status, order_id=after.order_id)
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


async def _claimed(conn: AsyncConnection, events: Sequence[ev.QualificationClaimed]) -> None:
    if not events:
        return
    rows = []
    per_day: dict[tuple[str, str], int] = {}
    for event in events:
        claimed = domain.evolve(None, event)
        assert claimed is not None
        rows.append(asdict(claimed))
        day = (event.category, event.quota_day)
        per_day[day] = per_day.get(day, 0) + 1
    await conn.execute(insert(qualifications), rows)
    stmt = pg_insert(quota_usage).values(
        [{"category": c, "day": d, "issued": n} for (c, d), n in sorted(per_day.items())]
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["category", "day"],
            set_={"issued": quota_usage.c.issued + stmt.excluded.issued},
        )
    )


async def rebuild(store: EventStore) -> int:
    """Drop the read models and replay every event; returns how many were applied.

    Only the read models of this service's own events are rebuilt: ``person_keys`` holds each
    person's wrapped data key (deleting a row shreds that person, so it is never recreated) and
    ``policies`` is a copy of catalog's documents, fed by catalog's events. Run it with the
    service quiesced: a consumer handling an event meanwhile would update rows being replaced.
    """
    return await store.rebuild(
        (qualifications, quota_usage, consumer_platforms, identity_failures, consumers),
        apply_event,
    )
