"""Claims under the 10:00 rush: the claims of one category and day decided in batches.

Every claim locks the consumer's stream and the day's quota row of its category (so that the
quota is exact under any concurrency, across replicas). One transaction per claim makes all
claims of a category queue on that row, each paying its whole statement sequence while the
others wait. :class:`ClaimBatcher` runs them through the kernel's batched runner
(``services.kernel.command_batch``, on its group commit): the claims that arrive for a
(category, day) while its previous batch commits are decided as one batch, in one transaction,
by ``Pipeline.run_many``:

1. lock the claimants' streams (in stream order) and then the quota row, the order a single
   claim takes them in, so batches and single claims of any replica never deadlock;
2. load every claimant's state in a few statements (:func:`load_claims`, the batched form of
   ``handlers._load_claim``);
3. decide each claim with the very decision a single claim runs (``domain.claim``, through the
   use case's ``decide``), in arrival order, each seeing the quota as the claims before it in
   the batch left it (``issued_today`` counts them), so the quota is exact within the batch
   as it is between batches;
4. append and project the issued ones in batched statements; a refused claim writes nothing and
   its caller gets its refusal, the others are unaffected.

A batch of one runs the single-claim path unchanged (``Pipeline.run`` with ``_load_claim``).
A batch whose transaction fails for anything but a refusal (a lost connection, a bug) is
retried claim by claim on that path, so one claim's failure is only its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message
from sqlalchemy import String, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.command_batch import CommandBatcher
from services.kernel.events import Context, payload_of
from services.kernel.eventstore import EventStore
from services.kernel.pipeline import Aggregate, Decision, Outcome, Pipeline
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain
from .persons import lock_persons, members_of
from .projections import as_qualification, consumer_platforms, qualifications, quota_usage


class ClaimKeyLike(Protocol):
    """What a claim is keyed by (``handlers.ClaimKey``): the claimant, the platform the claim
    comes through, the category and quota day, and the instant it is decided at."""

    @property
    def consumer_id(self) -> str: ...
    @property
    def platform_id(self) -> str: ...
    @property
    def category(self) -> str: ...
    @property
    def day(self) -> str: ...
    @property
    def now(self) -> datetime: ...


K = TypeVar("K", bound=ClaimKeyLike)
Group = tuple[str, str]  # (category, quota day): the claims that lock one quota row
IDS = ARRAY(String())


# The batch's statements, compiled once and run prepared (services/kernel/sql.py).
_ENROLLED_ANY = Statement(
    select(consumer_platforms.c.consumer_id, consumer_platforms.c.platform_id).where(
        consumer_platforms.c.consumer_id == any_(bindparam("ids", type_=IDS))
    ),
    name="enrolled_any",
)
_OWNED_ANY = Statement(
    select(qualifications).where(
        qualifications.c.consumer_id == any_(bindparam("ids", type_=IDS)),
        qualifications.c.category == any_(bindparam("cats", type_=IDS)),
    ),
    name="owned_qualifications_any",
)
# A day's quota row, created if missing, locked and read in one statement: an upsert that
# changes nothing takes the row lock and returns the count (the single claim's load too).
QUOTA_ROW = Statement(
    pg_insert(quota_usage)
    .values(category=bindparam("category"), day=bindparam("day"), issued=0)
    .on_conflict_do_update(
        index_elements=["category", "day"], set_={"issued": quota_usage.c.issued}
    )
    .returning(quota_usage.c.issued),
    name="quota_row",
)


async def load_claims(conn: AsyncConnection, keys: Sequence[K]) -> dict[K, domain.ClaimState]:
    """``handlers._load_claim`` for many claims, in a few statements: who is enrolled with the
    platform, the claimants' persons (locked in one sorted round, after their streams and
    before the quota row, the order a single claim takes them in), the qualifications of every
    consumer of those persons, and each day's quota row, locked (:data:`QUOTA_ROW`, as the
    single claim takes it). Call it with the claimants' streams locked.
    tests/e2e/test_claim_batch.py checks it answers as _load_claim does."""
    ids = sorted({k.consumer_id for k in keys})
    enrolled = {(r.consumer_id, r.platform_id) for r in await _ENROLLED_ANY.all(conn, ids=ids)}
    person_of = await lock_persons(conn, ids)  # same user: every consumer of a person counts
    members = await members_of(conn, sorted(set(person_of.values())))
    person: dict[str, frozenset[str]] = {
        c: members.get(person_of[c], frozenset({c})) if c in person_of else frozenset({c})
        for c in ids
    }
    everyone = sorted(set().union(*person.values()))
    categories = sorted({k.category for k in keys})
    owned: dict[tuple[str, str], list[domain.Qualification]] = {}
    for row in await _OWNED_ANY.all(conn, ids=everyone, cats=categories):
        owned.setdefault((row.consumer_id, row.category), []).append(as_qualification(row))
    issued: dict[Group, int] = {}
    for category, day in sorted({(k.category, k.day) for k in keys}):  # one lock order
        issued[(category, day)] = int(await QUOTA_ROW.scalar(conn, category=category, day=day) or 0)
    return {
        k: domain.ClaimState(
            (k.consumer_id, k.platform_id) in enrolled,
            tuple(q for c in sorted(person[k.consumer_id]) for q in owned.get((c, k.category), [])),
            issued[(k.category, k.day)],
            person[k.consumer_id],
        )
        for k in keys
    }


class _ClaimScope(Generic[K]):
    """A claim transaction's scope (services/kernel/command_batch.py): each claim decided as a
    single claim is, on the state the claims before it in the batch left (the day's quota they
    took, and what they issued to the same person). A claim alone has none before it."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.issued = 0  # issued by the claims before, in this transaction
        # ... and to each person: two linked consumers in one batch are one person's claims.
        self.issued_to: dict[frozenset[str], list[domain.Qualification]] = {}

    def decision(self, key: K, decide: Decision[domain.ClaimState]) -> Decision[domain.ClaimState]:
        def in_turn(state: domain.ClaimState | None) -> Sequence[Message]:
            if state is None:
                raise RuntimeError("load_claims and _load_claim answer every claim")
            earlier = tuple(self.issued_to.get(state.person, ()))
            counted = replace(
                state,
                issued_today=state.issued_today + self.issued,
                qualifications=state.qualifications + earlier,
            )
            events = list(decide(counted))  # a refusal raises: nothing counted
            for e in events:
                if isinstance(e, ev.QualificationClaimed):
                    self.issued += 1
                    q = domain.evolve(None, e)
                    assert q is not None
                    self.issued_to.setdefault(state.person, []).append(q)
            return events

        return in_turn

    def answer(self, key: K, outcome: Outcome[domain.ClaimState]) -> Outcome[domain.ClaimState]:
        return outcome


class ClaimBatcher(Generic[K]):
    """Claims of one (category, day) decided a batch at a time (see the module's docstring),
    on the kernel's batched runner (``CommandBatcher``).

    ``aggregate`` is the use case's claim aggregate (its ``load`` the single-claim path's);
    the batch loads with :func:`load_claims`."""

    def __init__(
        self,
        store: EventStore,
        pipeline: Pipeline,
        aggregate: Aggregate[K, domain.ClaimState],
        *,
        max_batch: int = 256,
        linger_s: float = 0.003,
    ) -> None:
        self.batcher: CommandBatcher[K, domain.ClaimState] = CommandBatcher(
            store,
            replace(aggregate, load_many=load_claims),
            lambda: _ClaimScope(pipeline),
            name="claims",
            group=lambda k: (k.category, k.day),  # the claims that lock one quota row
            max_batch=max_batch,
            linger_s=linger_s,
        )
        self.commit = self.batcher.commit

    async def run(
        self, key: K, decide: Decision[domain.ClaimState], ctx: Context
    ) -> Outcome[domain.ClaimState]:
        """``Pipeline.run(aggregate, key, decide, ctx, reload=False)``, in a batch with the
        concurrent claims of the same category and day. Raises the claim's refusal."""
        return await self.batcher.run(key, decide, ctx)


def claimed(outcome: Outcome[domain.ClaimState]) -> domain.Qualification | None:
    """The qualification a claim issued, as the projection records it (``domain.evolve`` of
    its QualificationClaimed), so the claim answers without reading it back."""
    for env in outcome.appended:
        event = payload_of(env)
        if isinstance(event, ev.QualificationClaimed):
            return domain.evolve(None, event)
    return None
