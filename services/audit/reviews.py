"""Supervisor reviews of operator actions: the read model and the use cases on the kernel's
pipeline. The rules are in :mod:`services.audit.reviews_domain`; the gRPC edge is in
:mod:`services.audit.cases_api` (CaseService).

- Each review is a stream, ``review/<review_id>``, in the audit service's own store; the
  ``supervision_reviews`` and ``supervision_review_actions`` tables are its read model
  (:func:`apply_event` runs ``reviews_domain.evolve`` inside the pipeline's transaction).
- The population is the ``operator_actions`` table the supervision consumer keeps (every
  action of a person, from every service's events), ordered by (occurred_at, event_id).
- A flagged action opens a SUPERVISOR_REVIEW case in the same transaction, its note sealed as
  the case's text under the case's own key; the review's event keeps only its digest and length.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    String,
    Table,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.events import Context, Envelope, payload_of
from services.kernel.eventstore import EventStore
from services.kernel.pipeline import Aggregate, Pipeline
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

from . import reviews_domain as domain
from .cases import SERVICE, Cases, operator_actions, text_digest
from .log import metadata

MAX_SEED = 2**63 - 1  # the seed is kept in a BIGINT column

reviews = Table(
    "supervision_reviews",
    metadata,
    Column("review_id", String(80), primary_key=True),
    Column("reviewer", String(64), nullable=False),
    Column("operator", String(64), nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("size", Integer, nullable=False),
    Column("population", Integer, nullable=False),
    Column("population_last_event_id", String(36), nullable=False),
    Column("sampled_at", DateTime(timezone=True), nullable=False),
)
review_actions = Table(
    "supervision_review_actions",
    metadata,
    Column("review_id", String(80), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("operator", String(64), nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("case_id", String(80), nullable=False),
    Column("reviewed_at", DateTime(timezone=True), nullable=True),
)

TABLES = (reviews, review_actions)  # what a replay of the audit service's own store rebuilds


def review_stream(review_id: str) -> str:
    return f"review/{review_id}"


async def load_review(conn: AsyncConnection, review_id: str) -> domain.Review | None:
    head = (await conn.execute(select(reviews).where(reviews.c.review_id == review_id))).first()
    if head is None:
        return None
    rows = (
        await conn.execute(
            select(review_actions)
            .where(review_actions.c.review_id == review_id)
            .order_by(review_actions.c.position)
        )
    ).all()
    marked = sorted((r for r in rows if r.verdict), key=lambda r: (r.reviewed_at, r.position))
    return domain.Review(
        review_id=head.review_id,
        reviewer=head.reviewer,
        operator=head.operator,
        sampled=tuple(domain.Candidate(r.event_id, r.operator) for r in rows),
        verdicts=tuple((r.event_id, r.verdict) for r in marked),
    )


REVIEW: Aggregate[str, domain.Review] = Aggregate("review", review_stream, load_review)


async def apply_event(conn: AsyncConnection, env: Envelope) -> None:
    """Apply one of the review events to the read model; verdicts come from
    :func:`reviews_domain.evolve`, never decided here."""
    event = payload_of(env)
    if isinstance(event, ev.OperatorActionsSampled):
        after = domain.evolve(None, event)
        assert after is not None
        await conn.execute(
            pg_insert(reviews)
            .values(
                review_id=after.review_id,
                reviewer=after.reviewer,
                operator=after.operator,
                seed=event.seed,
                size=event.size,
                population=event.population,
                population_last_event_id=event.population_last_event_id,
                sampled_at=event.at.ToDatetime(tzinfo=UTC),
            )
            .on_conflict_do_nothing()
        )
        rows = [
            {
                "review_id": after.review_id,
                "event_id": c.event_id,
                "position": i,
                "operator": c.operator,
                "verdict": "",
                "case_id": "",
                "reviewed_at": None,
            }
            for i, c in enumerate(after.sampled)
        ]
        await conn.execute(pg_insert(review_actions).values(rows).on_conflict_do_nothing())
    elif isinstance(event, ev.OperatorActionReviewed):
        after = domain.evolve(await load_review(conn, event.review_id), event)
        if after is None:
            return
        await conn.execute(
            review_actions.update()
            .where(
                review_actions.c.review_id == event.review_id,
                review_actions.c.event_id == event.event_id,
            )
            .values(
                verdict=after.verdict(event.event_id),
                case_id=event.case_id,
                reviewed_at=event.at.ToDatetime(tzinfo=UTC),
            )
        )


@dataclass(frozen=True)
class ReviewedAction:
    """A sampled action as a review shows it: the recorded action and its verdict."""

    action: dict[str, object]  # the operator_actions row
    verdict: str
    case_id: str


@dataclass(frozen=True)
class ReviewView:
    """A review with its sampled actions, in draw order."""

    head: dict[str, object]
    actions: list[ReviewedAction]


class Reviews:
    """Supervisor reviews of samples of operator actions."""

    def __init__(
        self,
        store: EventStore,
        cases: Cases,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.cases = cases
        self.clock = clock or cases.clock
        self.pipeline = Pipeline(store, SERVICE, apply_event)

    async def sample(
        self, size: int, operator: str, seed: int | None, actor: common_pb2.Actor
    ) -> str:
        """Draw a sample of the recorded actions (``operator``'s, or everyone's but the
        reviewer's) as a new review; its id. Without a seed a fresh random one is drawn, so
        nobody can tell in advance which actions a review will pick (it is recorded either
        way, so the sample can be drawn again)."""
        review_id = f"review-{uuid.uuid4().hex[:20]}"
        if seed is None:
            seed = secrets.randbits(63)
        query = select(operator_actions.c.event_id, operator_actions.c.operator).order_by(
            operator_actions.c.occurred_at, operator_actions.c.event_id
        )
        if operator:
            query = query.where(operator_actions.c.operator == operator)
        async with self.store.transaction() as tx:
            population = [
                domain.Candidate(r.event_id, r.operator) for r in await tx.conn.execute(query)
            ]
            command = domain.Sample(
                review_id, actor.id, operator, size, seed, population, self.clock()
            )
            await self.pipeline.run(
                REVIEW,
                review_id,
                lambda r: domain.sample(r, command),
                Context(actor, correlation_id=review_id),
                tx=tx,
                reload=False,
            )
        return review_id

    async def mark(
        self, review_id: str, event_id: str, verdict: str, note: str, actor: common_pb2.Actor
    ) -> None:
        """Mark one sampled action reviewed; a flag opens a case about the action's person,
        in the same transaction (both or neither)."""
        flagged = verdict == domain.FLAGGED
        case_id = domain.flag_case_id(review_id, event_id) if flagged else ""
        digest, length = text_digest(note) if note else ("", 0)
        command = domain.Mark(event_id, verdict, actor.id, self.clock(), digest, length, case_id)
        async with self.store.transaction() as tx:
            outcome = await self.pipeline.run(
                REVIEW,
                review_id,
                lambda r: domain.mark(r, command),
                Context(actor, correlation_id=review_id),
                tx=tx,
                reload=False,
            )
            if not flagged:
                return
            [env] = outcome.appended
            reviewed = ev.OperatorActionReviewed.FromString(env.payload)
            row = (
                await tx.conn.execute(
                    select(operator_actions).where(operator_actions.c.event_id == event_id)
                )
            ).first()
            what = f"{row.event_type} on {row.stream_id}" if row is not None else event_id
            await self.cases.open_flagged_action(
                tx,
                case_id,
                reviewed.operator,
                event_id,
                f"{reviewed.operator}'s {what} flagged in {review_id}",
                note,
                actor,
            )

    async def get(self, review_id: str) -> ReviewView:
        """A review and its sampled actions (draw order), with each action's record."""
        async with self.store.engine.connect() as conn:
            head = (
                await conn.execute(select(reviews).where(reviews.c.review_id == review_id))
            ).first()
            if head is None:
                raise domain.unknown_review()
            rows = (
                await conn.execute(
                    select(review_actions, operator_actions)
                    .join(
                        operator_actions,
                        operator_actions.c.event_id == review_actions.c.event_id,
                        isouter=True,
                    )
                    .where(review_actions.c.review_id == review_id)
                    .order_by(review_actions.c.position)
                )
            ).all()
        actions = []
        for r in rows:
            m = r._mapping
            record = {c.name: m[operator_actions.c[c.name]] for c in operator_actions.columns}
            record["event_id"] = m[review_actions.c.event_id]
            actions.append(
                ReviewedAction(record, m[review_actions.c.verdict], m[review_actions.c.case_id])
            )
        return ReviewView(dict(head._mapping), actions)
