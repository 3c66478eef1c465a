"""Claims under the 10:00 rush: the claims of one category and day decided in batches.

Every claim locks the consumer's stream and the day's quota row of its category (so that the
quota is exact under any concurrency, across replicas). One transaction per claim makes all
claims of a category queue on that row, each paying its whole statement sequence while the
others wait. :class:`ClaimBatcher` runs them through the kernel's group commit
(``services.kernel.batching``): the claims that arrive for a (category, day) while its previous
batch commits are decided as one batch, in one transaction, by ``Pipeline.run_many``:

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

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message
from sqlalchemy import String, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel import metrics
from services.kernel.batching import GroupCommit
from services.kernel.errors import DomainError
from services.kernel.events import Context, current_trace_context, payload_of
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Decision, Outcome, Pipeline
from services.kernel.sql import Statement
from subsidy.v1 import events_pb2 as ev

from . import domain
from .persons import lock_persons, members_of
from .projections import as_qualification, consumer_platforms, qualifications, quota_usage

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Pending(Generic[K]):
    key: K
    decide: Decision[domain.ClaimState]
    ctx: Context


class ClaimBatcher(Generic[K]):
    """Claims of one (category, day) decided a batch at a time (see the module's docstring).

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
        self.store = store
        self.pipeline = pipeline
        self.single = aggregate
        self.batched: Aggregate[K, domain.ClaimState] = replace(aggregate, load_many=load_claims)
        self.commit: GroupCommit[Group, _Pending[K], Outcome[domain.ClaimState]] = GroupCommit(
            self._flush,
            max_batch=max_batch,
            linger_s=linger_s,
            distinct=self._stream_of,  # run_many takes each stream once
            on_batch=metrics.BATCH_SIZE.labels("claims").observe,
        )

    def _stream_of(self, pending: _Pending[K]) -> Hashable:
        return self.single.stream(pending.key)

    async def run(
        self, key: K, decide: Decision[domain.ClaimState], ctx: Context
    ) -> Outcome[domain.ClaimState]:
        """``Pipeline.run(aggregate, key, decide, ctx, reload=False)``, in a batch with the
        concurrent claims of the same category and day. Raises the claim's refusal."""
        if ctx.trace_context is None:  # the batch runs in its own task: keep the caller's trace
            ctx = replace(ctx, trace_context=current_trace_context())
        return await self.commit.submit((key.category, key.day), _Pending(key, decide, ctx))

    async def _alone(self, pending: _Pending[K]) -> Outcome[domain.ClaimState] | BaseException:
        try:
            return await self.pipeline.run(
                self.single, pending.key, pending.decide, pending.ctx, reload=False
            )
        except Exception as exc:
            return exc

    async def _flush(
        self, group: Group, batch: Sequence[_Pending[K]]
    ) -> list[Outcome[domain.ClaimState] | BaseException]:
        if len(batch) == 1:
            return [await self._alone(batch[0])]
        try:
            async with self.store.transaction() as tx:
                return await self._decide(tx, batch)
        except Exception:
            log.warning("a batch of %d claims failed; each alone now", len(batch), exc_info=True)
            return [await self._alone(p) for p in batch]

    async def _decide(
        self, tx: Tx, batch: Sequence[_Pending[K]]
    ) -> list[Outcome[domain.ClaimState] | BaseException]:
        issued = 0  # issued by the claims before, in this batch
        # ... and to each person: two linked consumers in one batch are one person's claims.
        issued_to: dict[frozenset[str], list[domain.Qualification]] = {}
        refused: dict[int, DomainError] = {}

        def in_turn(i: int, pending: _Pending[K]) -> Decision[domain.ClaimState]:
            def decide(state: domain.ClaimState | None) -> Sequence[Message]:
                nonlocal issued
                if state is None:
                    raise RuntimeError("load_claims answers every claim")
                earlier = tuple(issued_to.get(state.person, ()))
                counted = replace(
                    state,
                    issued_today=state.issued_today + issued,
                    qualifications=state.qualifications + earlier,
                )
                try:
                    events = list(pending.decide(counted))
                except DomainError as refusal:
                    refused[i] = refusal
                    return []
                for e in events:
                    if isinstance(e, ev.QualificationClaimed):
                        issued += 1
                        q = domain.evolve(None, e)
                        assert q is not None
                        issued_to.setdefault(state.person, []).append(q)
                return events

            return decide

        outcomes = await self.pipeline.run_many(
            self.batched,
            [(p.key, in_turn(i, p)) for i, p in enumerate(batch)],
            [p.ctx for p in batch],
            tx=tx,
        )
        return [refused.get(i, outcome) for i, outcome in enumerate(outcomes)]


def claimed(outcome: Outcome[domain.ClaimState]) -> domain.Qualification | None:
    """The qualification a claim issued, as the projection records it (``domain.evolve`` of
    its QualificationClaimed), so the claim answers without reading it back."""
    for env in outcome.appended:
        event = payload_of(env)
        if isinstance(event, ev.QualificationClaimed):
            return domain.evolve(None, event)
    return None
