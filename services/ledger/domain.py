"""Ledger decisions, pure: state + command -> events. No I/O, no clock (``now`` comes in).

How each event moves a pool's money, per funding source, is the budget fold in
:mod:`services.kernel.contract.budget`, shared with the auditor's replay; the decisions here
refuse what would break it, and apply the funding rules of the order's policy version
(``FundingRules``): which source pays (the split rule), how much a category may take (its
sub-budget), and which spent shares raise an alert (thresholds, once each).
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.kernel.contract import order_line
from services.kernel.contract.budget import (
    Parts,
    Pool,
    Source,
    parts_message,
    parts_of,
    split_pro_rata,
)

# The funding checks are the ledger's decisions; they live in the contract because the
# auditor's what-if replays them (re-exported: callers and tests name them as the ledger's).
from services.kernel.contract.funds import DEFAULT_RULES as DEFAULT_RULES
from services.kernel.contract.funds import CategoryUse as CategoryUse
from services.kernel.contract.funds import check_budget as check_budget
from services.kernel.contract.funds import check_funds as check_funds
from services.kernel.contract.funds import check_sub_budget as check_sub_budget
from services.kernel.contract.funds import evolve_use as evolve_use
from services.kernel.contract.funds import split as split
from services.kernel.contract.policy import BP_DENOMINATOR, FundingRules, PaidAmount
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import events_pb2 as ev

MAX_FUNDING_FEN = 10**14  # a trillion yuan: anything above is a typo, not a budget
MAX_TRANCHES = 120  # ten years of monthly instalments
MAX_SHARDS = 64  # far more than the database's cores: more shards only cost rebalances

PENDING, CAPTURED, RELEASED = "PENDING", "CAPTURED", "RELEASED"
RELEASE_REASONS = ("CANCELLED", "REFUNDED", "EXPIRED")


@dataclass(frozen=True)
class Reservation:
    order_id: str
    pool_id: str
    subsidy_fen: int
    status: str
    qualification_id: str = ""
    sources: Parts = ()  # what each funding source holds (empty: reserved before sources)
    category: str = ""
    unit_price_fen: int = 0  # the item's price the platform reserved at


@dataclass(frozen=True)
class Tranche:
    """One instalment of a funding: ``amount_fen`` becomes available at ``releases_at``."""

    amount_fen: int
    releases_at: dt.datetime


@dataclass(frozen=True)
class ScheduledTranche:
    """A tranche of an approved funding, not released yet (what the release decision reads)."""

    pool_id: str
    funding_key: str
    index: int
    source: str
    amount_fen: int
    releases_at: dt.datetime


def check_amount(amount_fen: int) -> int:
    """A funding's amount: 1..MAX_FUNDING_FEN fen (anything else is a typo, not a budget)."""
    if amount_fen <= 0 or amount_fen > MAX_FUNDING_FEN:
        raise InvalidArgument(
            "INVALID_AMOUNT", f"amount_fen: must be 1..{MAX_FUNDING_FEN} fen", field="amount_fen"
        )
    return amount_fen


def check_tranches(amount_fen: int, tranches: tuple[Tranche, ...]) -> tuple[Tranche, ...]:
    """A schedule is at most MAX_TRANCHES instalments of at least 1 fen each, summing to the
    funding's amount; returned in time order (ties keep their order)."""
    if not tranches:
        return ()
    if len(tranches) > MAX_TRANCHES:
        raise InvalidArgument(
            "INVALID_TRANCHES", f"tranches: at most {MAX_TRANCHES}", field="tranches"
        )
    if any(t.amount_fen <= 0 for t in tranches) or sum(t.amount_fen for t in tranches) != (
        amount_fen
    ):
        raise InvalidArgument(
            "INVALID_TRANCHES",
            "tranches: every amount_fen at least 1 fen, and together exactly amount_fen",
            field="tranches",
        )
    return tuple(sorted(tranches, key=lambda t: t.releases_at))


def fund(
    pool: Pool, amount_fen: int, source: str, tranches: tuple[Tranche, ...] = ()
) -> list[Message]:
    """Fund a pool from ``source``: available at once, or scheduled when ``tranches`` are."""
    check_amount(amount_fen)
    funded = ev.BudgetFunded(pool_id=pool.pool_id, amount_fen=amount_fen, source=source)
    for t in check_tranches(amount_fen, tranches):
        part = funded.tranches.add(amount_fen=t.amount_fen)
        part.releases_at.FromDatetime(t.releases_at.astimezone(dt.UTC))
    return [funded]


def release_due(pending: list[ScheduledTranche], now: dt.datetime) -> list[Message]:
    """Every scheduled tranche whose time has come by ``now`` becomes available, in time order;
    a tranche not due yet stays scheduled."""
    due = sorted(
        (t for t in pending if t.releases_at <= now),
        key=lambda t: (t.releases_at, t.funding_key, t.index),
    )
    events: list[Message] = []
    for t in due:
        released = ev.TrancheReleased(
            pool_id=t.pool_id,
            source=t.source,
            amount_fen=t.amount_fen,
            funding_key=t.funding_key,
            index=t.index,
        )
        released.releases_at.FromDatetime(t.releases_at.astimezone(dt.UTC))
        events.append(released)
    return events


def scheduled(funded: ev.BudgetFunded) -> list[ScheduledTranche]:
    """The tranches a funding schedules (its key names them; index in schedule order)."""
    return [
        ScheduledTranche(
            funded.pool_id,
            funded.idempotency_key,
            i,
            funded.source,
            t.amount_fen,
            t.releases_at.ToDatetime(tzinfo=dt.UTC),
        )
        for i, t in enumerate(funded.tranches)
    ]


def reserve(
    pool: Pool | None,
    reserved: ev.SubsidyReserved,
    rules: FundingRules = DEFAULT_RULES,
    use: CategoryUse | None = None,
    total: Pool | None = None,
) -> list[Message]:
    """Reserve ``reserved.subsidy_fen`` from the pool (or the shard of it that holds the order:
    ``total`` is then the whole pool's figures), split over its sources, or refuse: never
    overspend the pool, a shard, a sub-budget or a source."""
    parts = check_funds(
        pool, reserved.pool_id, reserved.category, reserved.subsidy_fen, rules, use, total
    )
    del reserved.sources[:]
    reserved.sources.extend(parts_message(parts))
    return [reserved]


# --------------------------------------------------------------------------------------------
# Commands and the state they are decided on


@dataclass(frozen=True)
class Fund:
    pool_id: str
    amount_fen: int
    source: str
    idempotency_key: str = ""
    tranches: tuple[Tranche, ...] = ()


@dataclass(frozen=True)
class Funding:
    """A pool as funding sees it: its figures, what an idempotency key funded before, and the
    platforms it serves."""

    pool: Pool | None
    prior: tuple[str, int] | None = None  # (pool_id, amount_fen) funded under the same key
    platforms: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Reserve:
    """A platform's checkout: hold the subsidy for one order, or one item of a multi-item
    order (idempotent on ``order_id``, the reservation's key: ``order_id/item`` for an item)."""

    order_id: str
    platform_id: str
    pool_id: str
    consumer_id: str
    qualification_id: str
    sku: str
    unit_price_fen: int
    serial: str = ""
    item: str = ""  # the item of a multi-item order ("": the whole order)


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
    """A pool as a hold sees it under the pool's lock: its figures, whether the order was
    refused for good meanwhile (by the sweeper, or a concurrent attempt of the same order), and
    what the item's category already uses of it (loaded when the category has a sub-budget)."""

    pool: Pool | None
    refused: bool
    use: CategoryUse | None = None
    # A pool split into shards: ``pool`` is the order's shard, ``total`` the whole pool (its
    # funding is what a sub-budget is a share of), ``shards`` the shard count read under the
    # lock (an order routed by an older count is routed again).
    total: Pool | None = None
    shards: int = 1
    made: int = 1  # the pool's shard streams ever made (more than 1: siblings may pay)
    available: int = 0  # the whole pool's available (one snapshot), when it has shards


@dataclass(frozen=True)
class Settle:
    """An order's capture as it is decided under the pool's lock: the reservation, the pool's
    figures, the category's use, and the thresholds already alerted ``(category, bp)`` (the
    category empty for the whole pool)."""

    reservation: Reservation | None
    pool: Pool | None = None
    use: CategoryUse | None = None
    alerted: frozenset[tuple[str, int]] = frozenset()


def fund_once(state: Funding, cmd: Fund, now: dt.datetime | None = None) -> list[Message]:
    """Funding, idempotent on its key: the same key again funds nothing; the same key for a
    different funding is refused. Tranches due by ``now`` are released at once."""
    events = fund(state.pool or Pool(cmd.pool_id), cmd.amount_fen, cmd.source, cmd.tranches)
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
    if funded.tranches and now is not None:
        events += release_due(scheduled(funded), now)
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
    tranches: tuple[Tranche, ...] = ()
    shards: int = 0  # the pool's shard count once approved (0: unchanged)


@dataclass(frozen=True)
class ProposeFunding:
    proposal_id: str
    pool_id: str
    amount_fen: int
    source: str
    idempotency_key: str
    ceiling_fen: int  # the most a pool may ever be funded with (configured)
    platform_ids: tuple[str, ...] = ()  # the platforms the pool is to serve
    tranches: tuple[Tranche, ...] = ()  # empty: all of it available at approval
    shards: int = 0  # split the pool over this many shards when approved (0: unchanged)


@dataclass(frozen=True)
class ApproveFunding:
    proposal_id: str
    approver: str  # the approver's name, from their certificate
    ceiling_fen: int


def check_ceiling(pool: Pool | None, pool_id: str, amount_fen: int, ceiling_fen: int) -> None:
    """A pool's total funding (released and scheduled) never exceeds the configured ceiling."""
    funded = pool.funded + pool.scheduled if pool is not None else 0
    if funded + amount_fen > ceiling_fen:
        raise FailedPrecondition(
            "FUNDING_CEILING",
            f"amount_fen: pool {pool_id} would hold {funded + amount_fen} fen,"
            f" above the ceiling of {ceiling_fen} fen",
            field="amount_fen",
        )


def check_source(source: str, rules: FundingRules) -> str:
    """A funding names one of the sources the policy in force declares (any, if it declares
    none)."""
    if not rules.accepts(source):
        raise InvalidArgument(
            "UNKNOWN_SOURCE",
            f"source: {source!r} is not a funding source of this campaign"
            f" (one of: {', '.join(rules.sources)})",
            field="source",
        )
    return source


def propose_funding(
    existing: FundingProposal | None,
    pool: Pool | None,
    cmd: ProposeFunding,
    rules: FundingRules = DEFAULT_RULES,
) -> list[Message]:
    """An operator proposes funding a pool from one of the campaign's sources; nothing moves
    until a different person approves. The same key again is the same proposal; the same key
    for another funding is refused."""
    fund(Pool(cmd.pool_id), cmd.amount_fen, cmd.source, cmd.tranches)  # amount and schedule
    check_source(cmd.source, rules)
    check_shard_count(cmd.shards)
    if existing is not None:
        if (
            existing.pool_id,
            existing.amount_fen,
            existing.source,
            existing.tranches,
            existing.shards,
        ) != (
            cmd.pool_id,
            cmd.amount_fen,
            cmd.source,
            check_tranches(cmd.amount_fen, cmd.tranches),
            cmd.shards,
        ):
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                "idempotency_key: used before for a different funding",
                field="idempotency_key",
            )
        return []
    check_ceiling(pool, cmd.pool_id, cmd.amount_fen, cmd.ceiling_fen)
    proposed = ev.FundingProposed(
        proposal_id=cmd.proposal_id,
        pool_id=cmd.pool_id,
        amount_fen=cmd.amount_fen,
        source=cmd.source,
        idempotency_key=cmd.idempotency_key,
        platform_ids=cmd.platform_ids,
        shards=cmd.shards,
    )
    for t in check_tranches(cmd.amount_fen, cmd.tranches):
        part = proposed.tranches.add(amount_fen=t.amount_fen)
        part.releases_at.FromDatetime(t.releases_at.astimezone(dt.UTC))
    return [proposed]


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
    return Fund(
        proposal.pool_id,
        proposal.amount_fen,
        proposal.source,
        proposal.proposal_id,
        proposal.tranches,
    )


def tranches_of(event: ev.FundingProposed | ev.BudgetFunded) -> tuple[Tranche, ...]:
    """The schedule an event records."""
    return tuple(
        Tranche(t.amount_fen, t.releases_at.ToDatetime(tzinfo=dt.UTC)) for t in event.tranches
    )


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
            tranches=tranches_of(event),
            shards=event.shards,
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


def hold(
    state: Hold,
    cmd: Reserve,
    item: Item,
    expires_at: dt.datetime,
    rules: FundingRules = DEFAULT_RULES,
    indexes: Mapping[str, str] | None = None,
) -> list[Message]:
    """Hold the item's subsidy for the order until ``expires_at``, split over the pool's sources
    by the funding rules of the item's policy version, unless the order was refused for good
    (an order is held or refused, never both) or the pool, the category's sub-budget or a
    source cannot pay. ``indexes``: the order's circumstances as blind indexes, by kind, kept
    on the event for the post-hoc detectors."""
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
        item=cmd.item,
    )
    reserved.expires_at.FromDatetime(expires_at.astimezone(dt.UTC))
    reserved.circumstance_indexes.update(indexes or {})
    return reserve(state.pool, reserved, rules, state.use, state.total)


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


def unknown_item(order_id: str, item: str) -> NotFound:
    return NotFound("UNKNOWN_ITEM", f"item: order {order_id!r} has no item {item!r}", field="item")


def locate(order_id: str, item: str, lines: frozenset[str]) -> str:
    """The reservation a capture, release or evidence names, among ``lines`` (the keys the
    order has: itself when reserved whole, ``order_id/item`` per item of a multi-item order):
    an item the order does not have is UNKNOWN_ITEM (as is any item of a whole order); a
    multi-item order named without an item is ITEM_REQUIRED (one call settles one item)."""
    key = order_line.line_of(order_id, item)
    if key in lines:
        return key
    if not lines:
        raise unknown_order(order_id)
    if item:
        raise unknown_item(order_id, item)
    raise InvalidArgument(
        "ITEM_REQUIRED",
        f"item: order {order_id!r} was reserved item by item; name the item"
        f" (one of: {', '.join(sorted(order_line.split_line(k)[1] for k in lines))})",
        field="item",
    )


def new_line(cmd: Reserve, lines: dict[str, str]) -> None:
    """A first reserve of ``cmd.order_id`` (a line not reserved yet), beside the order's other
    lines (key -> platform): an order is reserved whole or item by item, never both, and all of
    it by one platform."""
    order_id = order_line.order_of(cmd.order_id)
    whole = order_id in lines
    if (cmd.item and whole) or (not cmd.item and lines):
        raise AlreadyExists(
            "ORDER_ID_REUSED",
            f"order_id: {order_id!r} is already reserved "
            + ("as a whole order (no items)" if whole else "item by item: name the item"),
            field="item",
        )
    if any(platform != cmd.platform_id for platform in lines.values()):
        raise AlreadyExists(
            "ORDER_ID_REUSED", "order_id: already reserved by another platform", field="order_id"
        )


PAID_AMOUNT_MISMATCH, PAID_AMOUNT_MISSING = "PAID_AMOUNT_MISMATCH", "PAID_AMOUNT_MISSING"


def check_paid(res: Reservation, paid_amount_fen: int | None, rule: PaidAmount) -> str:
    """What the consumer paid (after the instant discount) plus the subsidy must be the reserved
    unit price: the platform's declared price alone never decides the money. A mismatch, or no
    amount declared, is refused or flagged by the policy's rule; returns the flag ("" when the
    amount matches)."""
    expected = res.unit_price_fen - res.subsidy_fen
    if paid_amount_fen is None:
        flag, error = PAID_AMOUNT_MISSING, "paid_amount_fen: required by this order's policy"
    elif paid_amount_fen != expected:
        flag = PAID_AMOUNT_MISMATCH
        error = (
            f"paid_amount_fen: {paid_amount_fen} fen paid, but order {res.order_id} was reserved"
            f" at {res.unit_price_fen} fen less a subsidy of {res.subsidy_fen} fen:"
            f" {expected} fen"
        )
    else:
        return ""
    if rule is PaidAmount.REFUSE:
        raise FailedPrecondition(flag, error, field="paid_amount_fen")
    return flag


def capture(
    res: Reservation | None,
    payment_ref: str,
    paid_amount_fen: int | None = None,
    rule: PaidAmount = PaidAmount.FLAG,
) -> list[Message]:
    """Post the order's subsidy (each source pays what it held), recording what was paid; a
    capture again is the capture already posted (a retry changes nothing)."""
    if res is None:
        raise unknown_order("")
    if res.status == CAPTURED:
        return []  # idempotent: already posted
    if res.status != PENDING:
        raise FailedPrecondition(
            "RESERVATION_NOT_PENDING", f"order {res.order_id} is {res.status}", field="order_id"
        )
    flag = check_paid(res, paid_amount_fen, rule)
    return [
        ev.SubsidyCaptured(
            order_id=res.order_id,
            pool_id=res.pool_id,
            subsidy_fen=res.subsidy_fen,
            payment_ref=payment_ref,
            qualification_id=res.qualification_id,
            sources=parts_message(res.sources),  # what each source held is what it pays
            category=res.category,
            paid_amount_fen=paid_amount_fen,
            flag=flag,
        )
    ]


def reached(spent_fen: int, base_fen: int, threshold_bp: int) -> bool:
    """Whether ``spent_fen`` is at least ``threshold_bp`` of ``base_fen`` (exact, in integers)."""
    return base_fen > 0 and spent_fen * BP_DENOMINATOR >= threshold_bp * base_fen


def alerts(state: Settle, rules: FundingRules) -> list[Message]:
    """The thresholds the capture of ``state.reservation`` makes the pool, and its category,
    reach for the first time: one alert each, never twice. A pool's share is of its funded
    amount; a category's of its sub-budget, or of the pool's funded amount without one."""
    res, pool = state.reservation, state.pool
    if res is None or pool is None or not rules.alert_thresholds_bp:
        return []
    scopes = [("", pool.spent + res.subsidy_fen, pool.funded)]
    if res.category:  # an order reserved before categories were recorded: the pool only
        use = state.use or CategoryUse(res.category)
        share_bp = rules.sub_budget_bp(res.category)
        base = pool.funded if share_bp is None else pool.funded * share_bp // BP_DENOMINATOR
        scopes.append((res.category, use.spent + res.subsidy_fen, base))
    return [
        ev.BudgetThresholdReached(
            pool_id=res.pool_id,
            category=category,
            threshold_bp=bp,
            spent_fen=spent,
            base_fen=base,
            order_id=res.order_id,
        )
        for category, spent, base in scopes
        for bp in rules.alert_thresholds_bp
        if (category, bp) not in state.alerted and reached(spent, base, bp)
    ]


def capture_and_alert(
    state: Settle, payment_ref: str, rules: FundingRules, paid_amount_fen: int | None = None
) -> list[Message]:
    """Capture the order (its paid amount checked by the policy's rule), and raise the
    thresholds the capture reaches (once each)."""
    captured = capture(state.reservation, payment_ref, paid_amount_fen, rules.paid_amount)
    return [*captured, *alerts(state, rules)] if captured else []


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
            sources=parts_message(res.sources),  # back to the sources that held or paid it
            category=res.category,
        )
    ]


def evolve(res: Reservation | None, event: Message) -> Reservation | None:
    """The reservation after ``event``: the one place a reservation's status changes."""
    if isinstance(event, ev.SubsidyReserved):
        return Reservation(
            event.order_id,
            event.pool_id,
            event.subsidy_fen,
            PENDING,
            event.qualification_id,
            parts_of(event.sources),
            event.category,
            event.unit_price_fen,
        )
    if res is None:
        return None
    if isinstance(event, ev.SubsidyCaptured):
        return replace(res, status=CAPTURED)
    if isinstance(event, ev.SubsidyReleased):
        return replace(res, status=RELEASED)
    return res


# --------------------------------------------------------------------------------------------
# Shards: a hot pool's available budget split over several streams, so that checkouts on it
# spread over several locks; money moves between shards only by a rebalance, under every
# shard's lock, and each shard is a balanced pool of its own (services.invariants).

Plan = dict[int, list[Message]]  # the events to append per shard, appended in shard order


def check_shard_count(shards: int) -> int:
    """A pool's shard count: 1..MAX_SHARDS (0 in a request: leave it as it is)."""
    if shards < 0 or shards > MAX_SHARDS:
        raise InvalidArgument(
            "INVALID_SHARDS", f"shards: 1..{MAX_SHARDS} (0: unchanged)", field="shards"
        )
    return shards


def shard_of(key: str, shards: int) -> int:
    """The shard that holds a reservation: a stable hash of its key (the order id, or
    ``order_id/item``), so retries and every process pick the same one."""
    return zlib.crc32(key.encode()) % shards if shards > 1 else 0


def _take(available: dict[str, int], amount: int) -> Parts:
    """``amount`` of a shard's available, in proportion to what each source has available
    there (whole fen, sums to ``amount``; never more than a source has, as amount <= the sum),
    taken out of ``available``."""
    weights = [Source(name, funded=fen) for name, fen in available.items() if fen > 0]
    parts = split_pro_rata(weights, amount)
    for name, fen in parts:
        available[name] -= fen
    return parts


def _moves(pool_id: str, figures: Mapping[int, Pool], targets: Mapping[int, int]) -> Plan:
    """The moves that bring each shard's available to its target (the targets sum to what the
    shards have available): surplus shards give, in shard order, to deficit shards."""
    left = {k: {s.source: s.available for s in p.payers()} for k, p in figures.items()}
    surplus = {k: p.available - targets.get(k, 0) for k, p in figures.items()}
    plan: Plan = {}
    givers = sorted(k for k, fen in surplus.items() if fen > 0)
    for to in sorted(k for k in targets if targets[k] > figures.get(k, Pool(pool_id)).available):
        need = targets[to] - (figures[to].available if to in figures else 0)
        for frm in givers:
            give = min(need, surplus[frm])
            if give <= 0:
                continue
            parts = parts_message(_take(left[frm], give))
            plan.setdefault(frm, []).append(
                ev.ShardBudgetSent(
                    pool_id=pool_id, from_shard=frm, to_shard=to, amount_fen=give, sources=parts
                )
            )
            plan.setdefault(to, []).append(
                ev.ShardBudgetReceived(
                    pool_id=pool_id, from_shard=frm, to_shard=to, amount_fen=give, sources=parts
                )
            )
            surplus[frm] -= give
            need -= give
            if need == 0:
                break
    return plan


def spread(pool_id: str, figures: Mapping[int, Pool], shards: int) -> Plan:
    """Even out the available budget over shards 0..shards-1 (the first ones get the fen left
    over); a shard beyond them (the count was lowered) gives all it has available back."""
    available = sum(p.available for p in figures.values())
    targets = {k: available // shards + (1 if k < available % shards else 0) for k in range(shards)}
    return _moves(pool_id, figures, targets)


def rebalance(
    pool_id: str, figures: Mapping[int, Pool], shards: int, short: int, need: int
) -> Plan:
    """A shard that cannot pay ``need`` takes budget from its siblings (all of them locked):
    at least ``need``, and up to an even share of what the pool has available, the largest
    holders giving first. Nothing when the shard can pay, or when the whole pool cannot (the
    hold then refuses: BUDGET_EXHAUSTED is the pool's answer, not a shard's)."""
    own = figures[short].available if short in figures else 0
    available = sum(p.available for p in figures.values())
    if own >= need or available < need:
        return {}
    want = max(need, available // shards) - own
    targets = {k: p.available for k, p in figures.items()}
    targets[short] = own + want
    for k in sorted(figures, key=lambda k: (-figures[k].available, k)):
        if k == short or want == 0:
            continue
        give = min(want, figures[k].available)
        targets[k] -= give
        want -= give
    return _moves(pool_id, figures, targets)


def shard_pool(
    pool_id: str, figures: Mapping[int, Pool], current: int, shards: int, proposal_id: str = ""
) -> Plan:
    """Split the pool's available budget over ``shards`` (PoolSharded in the pool's stream,
    then the moves that even it out); the same count again changes nothing. Reservations held
    stay with the shard that holds them; a shard beyond a lowered count gives its available
    back, and what its reservations release later is rebalanced from it when needed."""
    check_shard_count(shards)
    if shards == 0 or shards == current:
        return {}
    if 0 not in figures:
        raise NotFound("UNKNOWN_POOL", f"pool_id: no budget pool {pool_id!r}", field="pool_id")
    plan = spread(pool_id, figures, shards)
    sharded = ev.PoolSharded(pool_id=pool_id, shards=shards, proposal_id=proposal_id)
    plan[0] = [sharded, *plan.get(0, [])]
    return plan
