"""Two fundings with one idempotency key at the same moment, on the real platform: one wins and
the other is told ALREADY_EXISTS (or gets the very same proposal), never INTERNAL; and the pool
is funded once."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from subsidy.v1 import ledger_pb2
from tests.e2e.conftest import Platform, status_of

ROUNDS = 8  # each round a fresh key: a race that loses only sometimes still shows up


def _propose(pool: str, key: str, amount_fen: int) -> ledger_pb2.ProposeFundingRequest:
    return ledger_pb2.ProposeFundingRequest(
        pool_id=pool, amount_fen=amount_fen, source="district", idempotency_key=key
    )


async def test_one_key_two_amounts_at_once_one_wins_the_other_is_already_exists(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    for _ in range(ROUNDS):
        pool, key = f"pool-{rng.randrange(10**9)}", f"race-{rng.randrange(10**12)}"
        outcomes = await asyncio.gather(
            p.ledger.ProposeFunding(_propose(pool, key, 1_000_000)),
            p.ledger.ProposeFunding(_propose(pool, key, 2_000_000)),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, ledger_pb2.FundingProposal)]
        lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert status_of(lost[0]) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "IDEMPOTENCY_KEY_REUSED",
            "idempotency_key",
        )
        (proposal,) = won
        assert proposal.amount_fen in (1_000_000, 2_000_000)
        assert proposal.status == "PROPOSED"
        # The winner is what the key means from now on.
        again = await p.ledger.ProposeFunding(_propose(pool, key, proposal.amount_fen))
        assert again.proposal_id == proposal.proposal_id


async def test_one_key_one_amount_at_once_is_one_proposal(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    for _ in range(ROUNDS):
        pool, key = f"pool-{rng.randrange(10**9)}", f"same-{rng.randrange(10**12)}"
        first, second = await asyncio.gather(
            p.ledger.ProposeFunding(_propose(pool, key, 3_000_000)),
            p.ledger.ProposeFunding(_propose(pool, key, 3_000_000)),
        )
        assert first.proposal_id == second.proposal_id
        assert (first.pool_id, first.amount_fen, first.status) == (pool, 3_000_000, "PROPOSED")
        assert (second.pool_id, second.amount_fen, second.status) == (pool, 3_000_000, "PROPOSED")


async def test_two_approvals_at_once_fund_the_pool_once(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    for _ in range(ROUNDS):
        pool, key = f"pool-{rng.randrange(10**9)}", f"appr-{rng.randrange(10**12)}"
        proposal = await p.ledger.ProposeFunding(_propose(pool, key, 4_000_000))
        approve = ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="ok")
        outcomes = await asyncio.gather(
            p.ledger.ApproveFunding(approve), p.ledger.ApproveFunding(approve)
        )
        assert {o.status for o in outcomes} == {"APPROVED"}
        budget = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
        assert (budget.funded_fen, budget.available_fen) == (4_000_000, 4_000_000)


@pytest.mark.parametrize("amounts", [(5_000_000, 6_000_000), (7_000_000, 7_000_000)])
async def test_racing_proposals_then_racing_approvals_fund_at_most_once(
    platform: Platform, rng: random.Random, amounts: tuple[int, int]
) -> None:
    p = platform
    pool, key = f"pool-{rng.randrange(10**9)}", f"both-{rng.randrange(10**12)}"
    proposed = await asyncio.gather(
        *(p.ledger.ProposeFunding(_propose(pool, key, a)) for a in amounts),
        return_exceptions=True,
    )
    ids = {o.proposal_id for o in proposed if isinstance(o, ledger_pb2.FundingProposal)}
    for o in proposed:
        if isinstance(o, grpc.aio.AioRpcError):
            assert o.code() == grpc.StatusCode.ALREADY_EXISTS, o
    (proposal_id,) = ids
    approve = ledger_pb2.ApproveFundingRequest(proposal_id=proposal_id, reason="ok")
    approved = await asyncio.gather(*(p.ledger.ApproveFunding(approve) for _ in range(3)))
    (amount,) = {o.amount_fen for o in approved}
    budget = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert budget.funded_fen == amount and amount in amounts
