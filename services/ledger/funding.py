"""Ledger use cases for funding a budget pool, maker-checker: an operator proposes, a different
approver approves, and only the approval moves money (in one transaction with the proposal's
approval). A funding names one of the sources the policy in force declares, and may release its
amount in tranches (those due at approval at once, the others by the ledger's sweeper). Part
of :class:`services.ledger.handlers.Ledger`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.contract import budget
from services.kernel.contract.budget import pool_stream, shard_stream
from services.kernel.errors import NotFound
from services.kernel.events import Context
from services.kernel.eventstore import EventStore, Tx
from services.kernel.pipeline import Aggregate, Pipeline
from subsidy.v1 import common_pb2

from . import domain
from .policies import FundingPolicies
from .projections import (
    Layout,
    funding_keys,
    load_layout,
    load_pool,
    load_pool_platforms,
    load_proposal,
    load_shards,
)


@dataclass(frozen=True)
class FundingKey:
    pool_id: str
    idempotency_key: str


async def _load_funding(conn: AsyncConnection, key: FundingKey) -> domain.Funding:
    prior = None
    if key.idempotency_key:
        row = (
            await conn.execute(
                select(funding_keys).where(funding_keys.c.idempotency_key == key.idempotency_key)
            )
        ).first()
        prior = (row.pool_id, row.amount_fen) if row is not None else None
    platforms = await load_pool_platforms(conn, key.pool_id)
    return domain.Funding(await load_pool(conn, key.pool_id), prior, platforms)


FUNDING: Aggregate[FundingKey, domain.Funding] = Aggregate(
    "budget-pool", lambda k: pool_stream(k.pool_id), _load_funding
)
PROPOSAL: Aggregate[str, domain.FundingProposal] = Aggregate(
    "funding-proposal", lambda proposal_id: f"funding/{proposal_id}", load_proposal
)


async def lock_shards(
    tx: Tx, pool_id: str, at_least: int = 1
) -> tuple[Layout, dict[int, budget.Pool]]:
    """Lock every shard stream of the pool (and up to ``at_least`` of them), in stream order
    as every multi-stream lock is taken (so two of them never deadlock), and read every
    shard's figures under those locks. A rebalance and a change of the shard count run so."""
    peek = await load_layout(tx.conn, pool_id)
    if peek is None:
        raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
    made = max(peek.made, at_least)
    while True:
        await tx.lock_streams([shard_stream(pool_id, k) for k in range(made)])
        # Only PoolSharded makes shards, under shard 0's lock, held now: this count is final
        # unless it grew before the lock was taken (then lock the new ones too).
        layout, figures = await load_shards(tx.conn, pool_id)
        if layout.made <= made:
            return layout, figures
        made = layout.made


async def append_plan(
    tx: Tx, pipeline: Pipeline, pool_id: str, plan: domain.Plan, ctx: Context
) -> None:
    """Append a plan's events to each shard's stream (locked by :func:`lock_shards`), in shard
    order, and project them, in ``tx``."""
    for shard in sorted(plan):
        stream = shard_stream(pool_id, shard)
        version = await tx.lock_stream(stream)  # held already: answers the version
        await tx.emit(pipeline.service, stream, version, plan[shard], ctx, pipeline.project)


def _funding(state: domain.Funding | None) -> domain.Funding:
    assert state is not None  # _load_funding always answers
    return state


class FundingUseCases:
    """Funding a pool; the ledger's store, pipeline and ceiling come from the Ledger."""

    store: EventStore
    pipeline: Pipeline
    funding_ceiling_fen: int
    policies: FundingPolicies
    clock: Callable[[], datetime]

    async def propose_funding(
        self, cmd: domain.ProposeFunding, actor: common_pb2.Actor
    ) -> tuple[domain.FundingProposal, budget.Pool | None]:
        """An operator proposes funding; nothing moves until a different approver approves."""
        ctx = Context(actor, correlation_id=cmd.proposal_id)
        _, rules = await self.policies.in_force()  # the campaign's sources
        async with self.store.transaction() as tx:
            pool = await load_pool(tx.conn, cmd.pool_id)
            outcome = await self.pipeline.run(
                PROPOSAL,
                cmd.proposal_id,
                lambda existing: domain.propose_funding(existing, pool, cmd, rules),
                ctx,
                tx=tx,
            )
        assert outcome.state is not None
        return outcome.state, pool

    async def approve_funding(
        self, cmd: domain.ApproveFunding, actor: common_pb2.Actor
    ) -> tuple[domain.FundingProposal, budget.Pool]:
        """A different approver approves: in one transaction the proposal is approved and the
        pool funded (lock order: the proposal's stream, then the pool's)."""
        ctx = Context(actor, correlation_id=cmd.proposal_id)
        async with self.store.transaction() as tx:
            proposal = await load_proposal(tx.conn, cmd.proposal_id)
            pool = await load_pool(tx.conn, proposal.pool_id) if proposal else None
            outcome = await self.pipeline.run(
                PROPOSAL,
                cmd.proposal_id,
                lambda current: domain.approve_funding(current, pool, cmd),
                ctx,
                tx=tx,
            )
            approved = outcome.state
            assert approved is not None
            funding = domain.funded_by(approved)
            now = self.clock()
            funded = await self.pipeline.run(
                FUNDING,
                FundingKey(funding.pool_id, funding.idempotency_key),
                lambda state: [
                    *domain.fund_once(_funding(state), funding, now),
                    *domain.assign(_funding(state).platforms, approved),
                ],
                ctx,
                tx=tx,
            )
        assert funded.state is not None and funded.state.pool is not None
        if approved.shards:  # after the funding, so its money is spread too (a retry: again)
            if await self.shard_pool(approved.pool_id, approved.shards, approved.proposal_id, ctx):
                async with self.store.engine.connect() as conn:
                    pool = await load_pool(conn, approved.pool_id)
                assert pool is not None
                return approved, pool
        return approved, funded.state.pool

    async def shard_pool(self, pool_id: str, shards: int, proposal_id: str, ctx: Context) -> bool:
        """Split the pool's available budget over ``shards`` (domain.shard_pool), under every
        shard's lock; False when it already has that many (nothing written)."""
        async with self.store.transaction() as tx:
            layout, figures = await lock_shards(tx, pool_id, shards)
            plan = domain.shard_pool(pool_id, figures, layout.shards, shards, proposal_id)
            await append_plan(tx, self.pipeline, pool_id, plan, ctx)
        return bool(plan)

    async def funding_proposal(
        self, proposal_id: str
    ) -> tuple[domain.FundingProposal, budget.Pool | None]:
        async with self.store.engine.connect() as conn:
            proposal = await load_proposal(conn, proposal_id)
            pool = await load_pool(conn, proposal.pool_id) if proposal else None
        if proposal is None:
            raise NotFound(
                "UNKNOWN_PROPOSAL", "proposal_id: no such funding proposal", field="proposal_id"
            )
        return proposal, pool
