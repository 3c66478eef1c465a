"""The budget fold: a pool's four figures after each ledger event, in integer fen.

A budget pool moves money between three buckets: available --reserve--> reserved --capture-->
spent; a release moves reserved (or, for a refund after capture, spent) back to available. The
ledger decides with this fold and the auditor replays the log through it, so both compute the
same figures, and the invariant funded = available + reserved + spent, available >= 0 is checked
after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.invariants import check_budget_balanced
from subsidy.v1 import events_pb2 as ev

POOL_STREAM_PREFIX = "budget-pool/"


def pool_stream(pool_id: str) -> str:
    """The ledger's stream of one pool's events (the auditor folds each such stream)."""
    return f"{POOL_STREAM_PREFIX}{pool_id}"


@dataclass(frozen=True)
class Pool:
    pool_id: str
    funded: int = 0
    available: int = 0
    reserved: int = 0
    spent: int = 0

    def check(self) -> None:
        check_budget_balanced(
            self.pool_id,
            funded=self.funded,
            available=self.available,
            reserved=self.reserved,
            spent=self.spent,
        )


def apply(pool: Pool, event: Message) -> Pool:
    """The pool after ``event``; the same fold serves inline updates and replays."""
    if isinstance(event, ev.BudgetFunded):
        pool = replace(
            pool, funded=pool.funded + event.amount_fen, available=pool.available + event.amount_fen
        )
    elif isinstance(event, ev.SubsidyReserved):
        pool = replace(
            pool,
            available=pool.available - event.subsidy_fen,
            reserved=pool.reserved + event.subsidy_fen,
        )
    elif isinstance(event, ev.SubsidyCaptured):
        pool = replace(
            pool, reserved=pool.reserved - event.subsidy_fen, spent=pool.spent + event.subsidy_fen
        )
    elif isinstance(event, ev.SubsidyReleased):
        if event.was_captured:
            pool = replace(
                pool,
                spent=pool.spent - event.subsidy_fen,
                available=pool.available + event.subsidy_fen,
            )
        else:
            pool = replace(
                pool,
                reserved=pool.reserved - event.subsidy_fen,
                available=pool.available + event.subsidy_fen,
            )
    pool.check()
    return pool
