"""Ledger decisions, pure: state + command -> events. No I/O.

How each event moves a pool's money is the budget fold in :mod:`services.kernel.contract.budget`,
shared with the auditor's replay; the decisions here refuse what would break it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.kernel.contract.budget import Pool
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
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


def check_budget(pool: Pool | None, pool_id: str, subsidy_fen: int) -> Pool:
    """The pool exists and can pay ``subsidy_fen`` now: never overspend."""
    if pool is None:
        raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
    if subsidy_fen <= 0:
        raise FailedPrecondition("NO_SUBSIDY", "the item earns no subsidy", field="sku")
    if subsidy_fen > pool.available:
        raise ResourceExhausted(
            "BUDGET_EXHAUSTED",
            f"budget pool {pool.pool_id} has {pool.available} fen left, {subsidy_fen} fen needed",
            field="pool_id",
        )
    return pool


def reserve(pool: Pool | None, reserved: ev.SubsidyReserved) -> list[Message]:
    """Reserve ``reserved.subsidy_fen`` from the pool, or refuse: never overspend."""
    check_budget(pool, reserved.pool_id, reserved.subsidy_fen)
    return [reserved]


# --------------------------------------------------------------------------------------------
# Commands and the state they are decided on


@dataclass(frozen=True)
class Fund:
    pool_id: str
    amount_fen: int
    source: str
    idempotency_key: str = ""


@dataclass(frozen=True)
class Funding:
    """A pool as funding sees it: its figures, what an idempotency key funded before, and the
    platforms it serves."""

    pool: Pool | None
    prior: tuple[str, int] | None = None  # (pool_id, amount_fen) funded under the same key
    platforms: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Reserve:
    """A platform's checkout: hold the subsidy for one order (idempotent on ``order_id``)."""

    order_id: str
    platform_id: str
    pool_id: str
    consumer_id: str
    qualification_id: str
    sku: str
    unit_price_fen: int
    serial: str = ""


@dataclass(frozen=True)
class Item:
    """What catalog verified of the item: its merchant, category and subsidy, and the policy
    version the subsidy was computed under."""

    merchant_id: str
    category: str
    subsidy_fen: int
    policy_version: str


@dataclass(frozen=True)
class Hold:
    """A pool as a hold sees it under the pool's lock: its figures, and whether the order was
    refused for good meanwhile (by the sweeper, or a concurrent attempt of the same order)."""

    pool: Pool | None
    refused: bool


def fund_once(state: Funding, cmd: Fund) -> list[Message]:
    """Funding, idempotent on its key: the same key again funds nothing; the same key for a
    different funding is refused."""
    events = fund(state.pool or Pool(cmd.pool_id), cmd.amount_fen, cmd.source)
    if state.prior is not None:
        if state.prior != (cmd.pool_id, cmd.amount_fen):
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                "idempotency_key: used before for a different funding",
                field="idempotency_key",
            )
        return []
    funded = events[0]
    assert isinstance(funded, ev.BudgetFunded)
    funded.idempotency_key = cmd.idempotency_key
    return events


# --------------------------------------------------------------------------------------------
# Funding, maker-checker: an operator proposes, a different approver approves


PROPOSED, APPROVED = "PROPOSED", "APPROVED"


@dataclass(frozen=True)
class FundingProposal:
    proposal_id: str
    pool_id: str
    amount_fen: int
    source: str
    status: str
    proposed_by: str
    approved_by: str = ""
    platform_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProposeFunding:
    proposal_id: str
    pool_id: str
    amount_fen: int
    source: str
    idempotency_key: str
    ceiling_fen: int  # the most a pool may ever be funded with (configured)
    platform_ids: tuple[str, ...] = ()  # the platforms the pool is to serve


@dataclass(frozen=True)
class ApproveFunding:
    proposal_id: str
    approver: str  # the approver's name, from their certificate
    ceiling_fen: int


def check_ceiling(pool: Pool | None, pool_id: str, amount_fen: int, ceiling_fen: int) -> None:
    """A pool's total funding never exceeds the configured ceiling."""
    funded = pool.funded if pool is not None else 0
    if funded + amount_fen > ceiling_fen:
        raise FailedPrecondition(
            "FUNDING_CEILING",
            f"amount_fen: pool {pool_id} would hold {funded + amount_fen} fen,"
            f" above the ceiling of {ceiling_fen} fen",
            field="amount_fen",
        )


def propose_funding(
    existing: FundingProposal | None, pool: Pool | None, cmd: ProposeFunding
) -> list[Message]:
    """An operator proposes funding a pool; nothing moves until a different person approves.
    The same key again is the same proposal; the same key for another funding is refused."""
    fund(Pool(cmd.pool_id), cmd.amount_fen, cmd.source)  # the amount's bounds
    if existing is not None:
        if (existing.pool_id, existing.amount_fen) != (cmd.pool_id, cmd.amount_fen):
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                "idempotency_key: used before for a different funding",
                field="idempotency_key",
            )
        return []
    check_ceiling(pool, cmd.pool_id, cmd.amount_fen, cmd.ceiling_fen)
    return [
        ev.FundingProposed(
            proposal_id=cmd.proposal_id,
            pool_id=cmd.pool_id,
            amount_fen=cmd.amount_fen,
            source=cmd.source,
            idempotency_key=cmd.idempotency_key,
            platform_ids=cmd.platform_ids,
        )
    ]


def approve_funding(
    proposal: FundingProposal | None, pool: Pool | None, cmd: ApproveFunding
) -> list[Message]:
    """A different approver approves a proposal: the pool is funded (BudgetFunded follows in
    the pool's stream). Approving an approved proposal again changes nothing."""
    if proposal is None:
        raise NotFound(
            "UNKNOWN_PROPOSAL", "proposal_id: no such funding proposal", field="proposal_id"
        )
    if proposal.status == APPROVED:
        return []
    if cmd.approver == proposal.proposed_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "proposal_id: the approver must be a different person from the proposer",
            field="proposal_id",
        )
    check_ceiling(pool, proposal.pool_id, proposal.amount_fen, cmd.ceiling_fen)
    return [
        ev.FundingApproved(
            proposal_id=proposal.proposal_id,
            pool_id=proposal.pool_id,
            amount_fen=proposal.amount_fen,
        )
    ]


def assign(assigned: frozenset[str], proposal: FundingProposal) -> list[Message]:
    """The platforms an approved proposal adds to its pool (each once)."""
    return [
        ev.PoolAssigned(pool_id=proposal.pool_id, platform_id=p)
        for p in sorted(set(proposal.platform_ids) - assigned)
    ]


def serves(assigned: frozenset[str], pool_id: str, platform: str | None) -> None:
    """A platform reaches only the pools assigned to it; to it, another pool is as unknown as
    one that does not exist (so pool ids cannot be probed). Everyone else reaches every pool."""
    if platform is not None and platform not in assigned:
        raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")


def funded_by(proposal: FundingProposal) -> Fund:
    """The funding an approved proposal makes (its key is the proposal id, so it funds once)."""
    return Fund(proposal.pool_id, proposal.amount_fen, proposal.source, proposal.proposal_id)


def evolve_proposal(
    proposal: FundingProposal | None, event: Message, actor_id: str
) -> FundingProposal | None:
    """The proposal after ``event``: the one place its status changes."""
    if isinstance(event, ev.FundingProposed):
        return FundingProposal(
            event.proposal_id,
            event.pool_id,
            event.amount_fen,
            event.source,
            PROPOSED,
            actor_id,
            platform_ids=tuple(event.platform_ids),
        )
    if proposal is not None and isinstance(event, ev.FundingApproved):
        return replace(proposal, status=APPROVED, approved_by=actor_id)
    return proposal


def order_refused() -> FailedPrecondition:
    return FailedPrecondition(
        "ORDER_REFUSED",
        "order_id: this order was refused after its qualification was locked;"
        " a refused order stays refused: check out again with a new order id",
        field="order_id",
    )


def hold(state: Hold, cmd: Reserve, item: Item, expires_at: dt.datetime) -> list[Message]:
    """Hold the item's subsidy for the order until ``expires_at``, unless the order was refused
    for good (an order is held or refused, never both) or the pool cannot pay."""
    if state.refused:
        raise order_refused()
    reserved = ev.SubsidyReserved(
        order_id=cmd.order_id,
        pool_id=cmd.pool_id,
        platform_id=cmd.platform_id,
        consumer_id=cmd.consumer_id,
        qualification_id=cmd.qualification_id,
        sku=cmd.sku,
        unit_price_fen=cmd.unit_price_fen,
        merchant_id=item.merchant_id,
        category=item.category,
        subsidy_fen=item.subsidy_fen,
        serial=cmd.serial,
    )
    reserved.expires_at.FromDatetime(expires_at.astimezone(dt.UTC))
    return reserve(state.pool, reserved)


def same_order(existing: Reserve, cmd: Reserve) -> None:
    """A retry of an order must be the same order: same item, price, qualification, pool."""
    if (
        replace(existing, order_id=cmd.order_id, platform_id=cmd.platform_id, serial=cmd.serial)
        != cmd
    ):
        raise AlreadyExists(
            "ORDER_ID_REUSED",
            "order_id: already reserved with a different item, price or qualification",
            field="order_id",
        )


def refuse(
    held: bool, order_id: str, pool_id: str, qualification_id: str, reason: str
) -> list[Message]:
    """Refuse an order for good after its qualification was locked (eligibility unlocks it
    when the event arrives), unless a concurrent attempt of the order holds it: then the lock
    is that attempt's."""
    if held:
        return []
    return [
        ev.ReservationRefused(
            order_id=order_id, pool_id=pool_id, qualification_id=qualification_id, reason=reason
        )
    ]


def unknown_order(order_id: str) -> NotFound:
    return NotFound("UNKNOWN_ORDER", f"order_id: no reservation for {order_id!r}", field="order_id")


def capture(res: Reservation | None, payment_ref: str) -> list[Message]:
    if res is None:
        raise unknown_order("")
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


def release(res: Reservation | None, reason: str) -> list[Message]:
    if res is None:
        raise unknown_order("")
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


def evolve(res: Reservation | None, event: Message) -> Reservation | None:
    """The reservation after ``event``: the one place a reservation's status changes."""
    if isinstance(event, ev.SubsidyReserved):
        return Reservation(
            event.order_id, event.pool_id, event.subsidy_fen, PENDING, event.qualification_id
        )
    if res is None:
        return None
    if isinstance(event, ev.SubsidyCaptured):
        return replace(res, status=CAPTURED)
    if isinstance(event, ev.SubsidyReleased):
        return replace(res, status=RELEASED)
    return res
