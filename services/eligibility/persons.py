"""Same user on the pipeline: record a consumer's identifiers and link persons, explain a
person, erase a consumer; and the locks that make per-person limits exact.

The decisions are in :mod:`services.eligibility.linking` (pure); the read models in
:mod:`services.eligibility.projections` (``consumer_identifiers``, ``persons``,
``person_members``, ``person_held_when_linked``, ``consumer_erasures``).

**Locks, in one global order** (so two commands never wait on each other in a cycle):

1. the consumer's stream (the pipeline takes it: a claim, an identification and an erasure of
   one consumer queue there);
2. the identifiers' locks (transaction-scoped advisory locks on space and blind index, in
   sorted order): two consumers given the same new identifier at once are linked by whichever
   commits second, which sees the first's row;
3. the persons' rows (``persons``, ``FOR UPDATE``, in sorted order, all in one round): claims
   of linked consumers serialise on their person's row, and a merge locks every person it
   merges before it reads what they hold.

A claim reads its consumer's person, locks that row and reads it again. A merge deletes the
rows of the persons it absorbs, so a claim that was waiting on one finds no row and looks up the
consumer's person again (:func:`lock_person`); one waiting on the surviving row reads the merged
membership once it has the lock. Either way the claim counts every consumer of the person.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import Message
from sqlalchemy import String, any_, bindparam, delete, select, text, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import vault
from services.kernel.contract.policy import Policy
from services.kernel.errors import Unavailable
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Pipeline
from services.kernel.sql import Statement
from subsidy.v1 import common_pb2

from . import domain, erasures, linking
from .projections import (
    as_qualification,
    consumer_erasures,
    consumer_identifiers,
    consumer_platforms,
    consumer_stream,
    consumers,
    person_held_when_linked,
    person_keys,
    person_members,
    persons,
    qualifications,
)

# -- the person lock ---------------------------------------------------------------------------


# The person lock's statements (a claim's hot path), compiled once and run prepared.
_IDS = ARRAY(String())
_LOCK_PERSON = Statement(
    select(persons.c.person_id)
    .join(person_members, person_members.c.person_id == persons.c.person_id)
    .where(person_members.c.consumer_id == bindparam("consumer_id"))
    .with_for_update(of=persons),
    name="lock_person",
)
_MEMBERS = Statement(
    select(person_members.c.consumer_id).where(person_members.c.person_id == bindparam("person")),
    name="person_members",
)
_PERSON_OF = Statement(
    select(person_members.c.person_id).where(
        person_members.c.consumer_id == bindparam("consumer_id")
    ),
    name="person_of",
)
_PERSONS_OF = Statement(
    select(person_members.c.consumer_id, person_members.c.person_id).where(
        person_members.c.consumer_id == any_(bindparam("ids", type_=_IDS))
    ),
    name="persons_of",
)
_LOCK_PERSONS = Statement(
    select(persons.c.person_id)
    .where(persons.c.person_id == any_(bindparam("ids", type_=_IDS)))
    .order_by(persons.c.person_id)
    .with_for_update(),
    name="lock_persons",
)
_MEMBERS_OF = Statement(
    select(person_members.c.person_id, person_members.c.consumer_id).where(
        person_members.c.person_id == any_(bindparam("ids", type_=_IDS))
    ),
    name="members_of",
)


async def lock_person(conn: AsyncConnection, consumer_id: str) -> frozenset[str]:
    """Lock the person ``consumer_id`` belongs to until the transaction ends, and return its
    consumers (two statements on the claim's hot path). A merge that absorbed the person while
    this waited deleted its row: look again."""
    while True:
        person = await _LOCK_PERSON.scalar(conn, consumer_id=consumer_id)
        if person is None:
            if await _person_of(conn, consumer_id) is None:
                return frozenset({consumer_id})  # not registered: nobody else to count
            continue  # absorbed by a merge while this waited: its row is gone
        # Read under the lock, so current; the consumer is in it unless a merge moved them
        # between the join's snapshot and the lock.
        members = frozenset(r.consumer_id for r in await _MEMBERS.all(conn, person=person))
        if consumer_id in members:
            return members


async def _person_of(conn: AsyncConnection, consumer_id: str) -> str | None:
    found: str | None = await _PERSON_OF.scalar(conn, consumer_id=consumer_id)
    return found


async def _lock_persons(conn: AsyncConnection, consumer_ids: Iterable[str]) -> dict[str, str]:
    """Lock the persons of ``consumer_ids`` in one sorted round and return each consumer's
    person. If a merge moved one of them meanwhile, give the round's locks back (a savepoint's
    rollback releases its row locks) and take a new round, so persons are only ever locked in
    sorted order."""
    wanted = sorted(set(consumer_ids))
    while True:
        before = await _persons_of(conn, wanted)
        savepoint = await conn.begin_nested()
        await _LOCK_PERSONS.run(conn, ids=sorted(set(before.values())))
        if await _persons_of(conn, wanted) == before:
            await savepoint.commit()
            return before
        await savepoint.rollback()


# A claim batch locks its claimants' persons in one round (claim_batch.py).
lock_persons = _lock_persons


async def members_of(conn: AsyncConnection, person_ids: Sequence[str]) -> dict[str, frozenset[str]]:
    """Each person's consumers (read under the persons' locks, so current)."""
    found: dict[str, set[str]] = {}
    for r in await _MEMBERS_OF.all(conn, ids=list(person_ids)):
        found.setdefault(r.person_id, set()).add(r.consumer_id)
    return {p: frozenset(cs) for p, cs in found.items()}


async def _persons_of(conn: AsyncConnection, consumer_ids: Sequence[str]) -> dict[str, str]:
    return {r.consumer_id: r.person_id for r in await _PERSONS_OF.all(conn, ids=list(consumer_ids))}


async def _lock_identifiers(conn: AsyncConnection, keys: Iterable[tuple[str, str]]) -> None:
    """Transaction-scoped locks on identifiers (space, blind index), in sorted order."""
    for space, index in sorted(set(keys)):
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"identifier/{space}/{index}"},
        )


# -- loads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentifyKey:
    consumer_id: str
    platform_id: str
    keys: tuple[tuple[str, str], ...]
    now: datetime


async def _erased(conn: AsyncConnection, consumer_id: str) -> bool:
    found = await conn.scalar(
        select(consumer_erasures.c.consumer_id).where(
            consumer_erasures.c.consumer_id == consumer_id
        )
    )
    return found is not None


async def _load_link_state(conn: AsyncConnection, key: IdentifyKey) -> linking.LinkState:
    """Under the consumer's lock: whether they may be served through the platform, the
    identifiers they have, every other holder of the command's identifiers and, with every
    person involved locked, what each person's consumers hold per category."""
    enrolled = await conn.scalar(
        select(consumer_platforms.c.consumer_id).where(
            consumer_platforms.c.consumer_id == key.consumer_id,
            consumer_platforms.c.platform_id == key.platform_id,
        )
    )
    if enrolled is None:
        return linking.LinkState(False, False, "", frozenset(), ())
    erased = await _erased(conn, key.consumer_id)
    await _lock_identifiers(conn, key.keys)
    own = await conn.execute(
        select(consumer_identifiers).where(consumer_identifiers.c.consumer_id == key.consumer_id)
    )
    known = frozenset((r.space, r.blind_index, linking.Kind(r.kind)) for r in own)
    rows = (
        (
            await conn.execute(
                select(consumer_identifiers).where(
                    tuple_(consumer_identifiers.c.space, consumer_identifiers.c.blind_index).in_(
                        list(key.keys)
                    ),
                    consumer_identifiers.c.consumer_id != key.consumer_id,
                )
            )
        ).all()
        if key.keys
        else []
    )
    person_of = await _lock_persons(conn, [key.consumer_id, *(r.consumer_id for r in rows)])
    involved = sorted(set(person_of.values()))
    member_rows = await conn.execute(
        select(person_members).where(person_members.c.person_id.in_(involved))
    )
    members: dict[str, set[str]] = {}
    for r in member_rows:
        members.setdefault(r.person_id, set()).add(r.consumer_id)
    quals = await conn.execute(
        select(qualifications).where(
            qualifications.c.consumer_id.in_([c for m in members.values() for c in m])
        )
    )
    by_person: dict[str, dict[str, list[domain.Qualification]]] = {}
    owner = {c: p for p, m in members.items() for c in m}
    for row in quals:
        q = as_qualification(row)
        by_person.setdefault(owner[q.consumer_id], {}).setdefault(q.category, []).append(q)
    held = {
        p: {c: domain.held(qs, key.now) for c, qs in cats.items()} for p, cats in by_person.items()
    }
    holders = tuple(
        linking.Holder(
            r.consumer_id, person_of[r.consumer_id], linking.Kind(r.kind), (r.space, r.blind_index)
        )
        for r in sorted(rows, key=lambda r: (r.consumer_id, r.kind))
        if r.consumer_id in person_of
    )
    return linking.LinkState(
        registered=True,
        erased=erased,
        person_id=person_of.get(key.consumer_id, linking.person_id([key.consumer_id])),
        known=known,
        holders=holders,
        held=held,
        members={p: frozenset(m) for p, m in members.items()},
    )


async def _load_erasure(conn: AsyncConnection, consumer_id: str) -> linking.ErasureState:
    registered = await conn.scalar(
        select(consumers.c.consumer_id).where(consumers.c.consumer_id == consumer_id)
    )
    return linking.ErasureState(registered is not None, await _erased(conn, consumer_id))


IDENTIFY: Aggregate[IdentifyKey, linking.LinkState] = Aggregate(
    "consumer", lambda k: consumer_stream(k.consumer_id), _load_link_state
)
ERASURE: Aggregate[str, linking.ErasureState] = Aggregate(
    "consumer", consumer_stream, _load_erasure
)


# -- the use cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One consumer of a person, masked."""

    consumer_id: str
    platform_ids: tuple[str, ...]
    erased: bool
    id_number_masked: str
    phone_masked: str


@dataclass(frozen=True)
class Explanation:
    """A person as an operator sees it (masked)."""

    person_id: str
    consumers: list[Member]
    links: list[linking.Link]
    held_when_linked: dict[str, int]


class Persons:
    """Same user: identifiers, links and erasure, on eligibility's store and pipeline."""

    def __init__(
        self,
        store: EventStore,
        keys: vault.Vault,
        pipeline: Pipeline,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.vault = keys
        self.pipeline = pipeline
        self.clock = clock

    async def index(
        self, values: Sequence[tuple[linking.Kind, str]], platform_id: str
    ) -> tuple[linking.Identifier, ...]:
        """Blind-index canonical identifier values (validated at the edge) in their spaces."""
        try:
            indexes = await asyncio.gather(
                *(
                    self.vault.blind_index(
                        linking.space(kind), linking.indexed_value(kind, value, platform_id)
                    )
                    for kind, value in values
                )
            )
        except vault.VaultUnavailable as exc:
            raise Unavailable("VAULT_UNAVAILABLE", str(exc)) from None
        return tuple(
            linking.Identifier(kind, index, linking.mask(kind, value))
            for (kind, value), index in zip(values, indexes, strict=True)
        )

    async def add_identifiers(
        self,
        consumer_id: str,
        platform_id: str,
        values: Sequence[tuple[linking.Kind, str]],
        actor: common_pb2.Actor,
    ) -> tuple[linking.Identifier, ...]:
        """AddIdentifiers: blind-index the platform's identifiers of one of its consumers,
        record them and link; returns them as kept (masked)."""
        identifiers = await self.index(values, platform_id)
        await self.identify(consumer_id, platform_id, identifiers, actor)
        return identifiers

    async def identify(
        self,
        consumer_id: str,
        platform_id: str,
        identifiers: Sequence[linking.Identifier],
        actor: common_pb2.Actor,
        *,
        tx: Tx | None = None,
    ) -> Sequence[Message]:
        """Record a consumer's identifiers and link the persons they share one with; returns
        the events recorded (none when everything was known and linked already)."""
        now = self.clock()
        command = linking.Identify(consumer_id, platform_id, tuple(identifiers), now)
        key = IdentifyKey(
            consumer_id, platform_id, tuple(sorted({i.key for i in identifiers})), now
        )
        outcome = await self.pipeline.run(
            IDENTIFY,
            key,
            lambda state: linking.identify(state, command),
            Context(actor, correlation_id=f"identify-{uuid.uuid4().hex}"),
            tx=tx,
            reload=False,
        )
        return outcome.appended

    async def erase(self, consumer_id: str, reason: str, actor: common_pb2.Actor) -> datetime:
        """Crypto-shred a consumer: ``ConsumerErased`` and the deletion of their wrapped data
        key commit together; the key is dropped from this process's cache too. Returns when."""
        command = linking.Erase(consumer_id, reason)
        async with self.store.transaction() as tx:
            outcome = await self.pipeline.run(
                ERASURE,
                consumer_id,
                lambda state: linking.erase(state, command),
                Context(actor, correlation_id=f"erase-{consumer_id}"),
                tx=tx,
                reload=False,
            )
            # Decided, not yet committed: registered outside the database first, so a restore
            # of an older backup erases them again (services/eligibility/erasures.py).
            await erasures.record(self.vault, consumer_id)
            wrapped = (
                await tx.conn.execute(
                    delete(person_keys)
                    .where(person_keys.c.consumer_id == consumer_id)
                    .returning(person_keys.c.wrapped_key)
                )
            ).scalars()
            destroyed = list(wrapped)
        for ciphertext in destroyed:
            self.vault.forget_cached(vault.WrappedKey(ciphertext))
        return outcome.appended[0].occurred_at.ToDatetime(tzinfo=UTC)

    async def explain(self, consumer_id: str, policy: Policy) -> Explanation:
        """The consumer's person: its consumers (masked), every link among them, and what it
        held over a limit when last linked."""
        async with self.store.engine.connect() as conn:
            person = await _person_of(conn, consumer_id)
            if person is None:
                raise linking.unknown_consumer()
            ids = sorted(
                (
                    await conn.execute(
                        select(person_members.c.consumer_id).where(
                            person_members.c.person_id == person
                        )
                    )
                ).scalars()
            )
            rows = (
                await conn.execute(select(consumers).where(consumers.c.consumer_id.in_(ids)))
            ).all()
            platforms = await conn.execute(
                select(consumer_platforms).where(consumer_platforms.c.consumer_id.in_(ids))
            )
            erased = set(
                (
                    await conn.execute(
                        select(consumer_erasures.c.consumer_id).where(
                            consumer_erasures.c.consumer_id.in_(ids)
                        )
                    )
                ).scalars()
            )
            idents = await conn.execute(
                select(consumer_identifiers).where(consumer_identifiers.c.consumer_id.in_(ids))
            )
            grandfathered = await conn.execute(
                select(person_held_when_linked).where(person_held_when_linked.c.person_id == person)
            )
            held_rows = grandfathered.all()
            ident_rows = idents.all()
            platform_rows = platforms.all()
        served: dict[str, list[str]] = {}
        for r in platform_rows:
            served.setdefault(r.consumer_id, []).append(r.platform_id)
        listed = [
            Member(
                r.consumer_id,
                tuple(sorted(served.get(r.consumer_id, []))),
                r.consumer_id in erased,
                r.id_number_masked,
                r.phone_masked,
            )
            for r in sorted(rows, key=lambda r: r.consumer_id)
        ]
        found = linking.links(
            [
                linking.Held(
                    r.consumer_id, linking.Kind(r.kind), (r.space, r.blind_index), r.masked
                )
                for r in ident_rows
            ]
        )
        over = {}
        for r in held_rows:
            rule = policy.category(r.category)
            if rule is None or r.held > rule.per_person_limit:
                over[r.category] = int(r.held)
        return Explanation(person, listed, found, over)


async def consumer_erased(conn: AsyncConnection, consumer_id: str) -> bool:
    """Whether ``consumer_id`` was erased (registration refuses the same person again)."""
    return await _erased(conn, consumer_id)


async def persons_and_allowances(
    conn: AsyncConnection,
) -> tuple[dict[str, str], dict[tuple[str, str], int]]:
    """Every consumer's person, and what each person held per category when last linked: what
    the per-person invariant (check_limits) counts by."""
    members = {r.consumer_id: r.person_id for r in await conn.execute(select(person_members))}
    held = {
        (r.person_id, r.category): int(r.held)
        for r in await conn.execute(select(person_held_when_linked))
    }
    return members, held
