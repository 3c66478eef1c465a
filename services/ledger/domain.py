"""Ledger decisions, pure: state + command -> events. No I/O.

How each event moves a pool's money is the budget fold in :mod:`services.contract.budget`,
shared with the auditor's replay; the decisions here refuse what would break it.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from services.contract.budget import Pool
from services.kernel.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from subsidy.v1 import events_pb2 as ev

MAX_FUNDING_FEN = 10**14  # a trillion yuan: anything above is a typo, not a budget

PENDING, CAPTURED, RELEASED = "PENDING", "CAPTURED", "RELEASED"
RELEASE_REASONS = ("CANCELLED", "REFUNDED", "EXPIRED")


@dataclass(frozen=True)
class Reservation:
    order_id: str
    pool_id: str
    subsidy_fen: int
    status: str
    qualification_id: str = ""


def fund(pool: Pool, amount_fen: int, source: str) -> list[Message]:
    if amount_fen <= 0 or amount_fen > MAX_FUNDING_FEN:
        raise InvalidArgument(
            "INVALID_AMOUNT", f"amount_fen: must be 1..{MAX_FUNDING_FEN} fen", field="amount_fen"
        )
    return [ev.BudgetFunded(pool_id=pool.pool_id, amount_fen=amount_fen, source=source)]


def reserve(pool: Pool | None, reserved: ev.SubsidyReserved) -> list[Message]:
    """Reserve ``reserved.subsidy_fen`` from the pool, or refuse: never overspend."""
    if pool is None:
        raise NotFound(
            "UNKNOWN_POOL", f"pool_id: no budget pool {reserved.pool_id!r}", field="pool_id"
        )
    if reserved.subsidy_fen <= 0:
        raise FailedPrecondition("NO_SUBSIDY", "the item earns no subsidy", field="sku")
    if reserved.subsidy_fen > pool.available:
        raise ResourceExhausted(
            "BUDGET_EXHAUSTED",
            f"budget pool {pool.pool_id} has {pool.available} fen left,"
            f" {reserved.subsidy_fen} fen needed",
            field="pool_id",
        )
    return [reserved]


def capture(res: Reservation, payment_ref: str) -> list[Message]:
    if res.status == CAPTURED:
        return []  # idempotent: already posted
    if res.status != PENDING:
        raise FailedPrecondition(
            "RESERVATION_NOT_PENDING", f"order {res.order_id} is {res.status}", field="order_id"
        )
    return [
        ev.SubsidyCaptured(
            order_id=res.order_id,
            pool_id=res.pool_id,
            subsidy_fen=res.subsidy_fen,
            payment_ref=payment_ref,
            qualification_id=res.qualification_id,
        )
    ]


def release(res: Reservation, reason: str) -> list[Message]:
    if reason not in RELEASE_REASONS:
        raise InvalidArgument(
            "INVALID_REASON", f"reason: one of {', '.join(RELEASE_REASONS)}", field="reason"
        )
    if res.status == RELEASED:
        return []  # idempotent
    if reason == "REFUNDED" and res.status != CAPTURED:
        raise FailedPrecondition(
            "NOT_CAPTURED",
            f"order {res.order_id} was never paid; cancel it instead",
            field="reason",
        )
    if reason in ("CANCELLED", "EXPIRED") and res.status != PENDING:
        raise FailedPrecondition(
            "ALREADY_CAPTURED", f"order {res.order_id} is paid; refund it instead", field="reason"
        )
    return [
        ev.SubsidyReleased(
            order_id=res.order_id,
            pool_id=res.pool_id,
            subsidy_fen=res.subsidy_fen,
            reason=reason,
            was_captured=res.status == CAPTURED,
            qualification_id=res.qualification_id,
        )
    ]
