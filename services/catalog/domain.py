"""Catalog decisions, pure: state + command -> events, and the item verdict. No I/O.

Each verb checks its rule and returns the events to append, or raises a named domain error
(docs/catalog.md lists every reason). The handlers load the state, call a verb, and append.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import Message

from services.contract.policy import Policy, Quote, Rounding, apply_bp, quote
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

# Policy version lifecycle.
DRAFT: Final = "DRAFT"
APPROVED: Final = "APPROVED"

# Merchant lifecycle.
APPLIED: Final = "APPLIED"
REJECTED: Final = "REJECTED"
SUSPENDED: Final = "SUSPENDED"

# Product lifecycle.
LISTED: Final = "LISTED"
DELISTED: Final = "DELISTED"

# Sales orders, as learnt from the ledger's events.
RESERVED: Final = "RESERVED"
CAPTURED: Final = "CAPTURED"
RELEASED: Final = "RELEASED"

# VerifyItem reasons beyond the policy's own quote reasons, in the order they are listed.
UNKNOWN_SKU: Final = "UNKNOWN_SKU"
CAMPAIGN_PAUSED: Final = "CAMPAIGN_PAUSED"
CATEGORY_PAUSED: Final = "CATEGORY_PAUSED"
MERCHANT_NOT_APPROVED: Final = "MERCHANT_NOT_APPROVED"
MERCHANT_SUSPENDED: Final = "MERCHANT_SUSPENDED"
PRODUCT_DELISTED: Final = "PRODUCT_DELISTED"
PRICE_ABOVE_BASELINE: Final = "PRICE_ABOVE_BASELINE"
SERIAL_ALREADY_SUBSIDISED: Final = "SERIAL_ALREADY_SUBSIDISED"
SERIAL_RESERVED: Final = "SERIAL_RESERVED"

# An approved version must reach every replica (they refresh twice a second) before it takes
# effect, or a replica could compute a reservation under the version it replaces.
APPROVAL_LEAD: Final = dt.timedelta(seconds=1)

OPERATOR_KINDS: Final = (common_pb2.Actor.KIND_OPERATOR, common_pb2.Actor.KIND_APPROVER)


# --------------------------------------------------------------------------------------------
# Actors


def require_operator(actor: common_pb2.Actor) -> None:
    """Operator verbs are done by a named person in the operator or approver role."""
    if actor.kind not in OPERATOR_KINDS:
        raise PermissionDenied(
            "OPERATOR_ROLE_REQUIRED", "actor.kind: an operator or approver", field="actor.kind"
        )


def require_approver(actor: common_pb2.Actor) -> None:
    if actor.kind != common_pb2.Actor.KIND_APPROVER:
        raise PermissionDenied(
            "APPROVER_ROLE_REQUIRED", "actor.kind: only an approver may approve", field="actor.kind"
        )


# --------------------------------------------------------------------------------------------
# Policy versions (maker-checker)


@dataclass(frozen=True)
class PolicyRecord:
    """A policy version as the catalog knows it: drafted, maybe approved."""

    version: str
    status: str
    effective_from: dt.datetime
    drafted_by: str
    approved_by: str = ""


def draft_policy(
    existing: PolicyRecord | None, policy: Policy, policy_json: str, reason: str, now: dt.datetime
) -> list[Message]:
    """An operator proposes a new version; it does nothing until a second person approves."""
    if existing is not None:
        raise AlreadyExists(
            "POLICY_VERSION_EXISTS",
            f"document.version: {policy.version} exists already ({existing.status}); "
            "never edit a version, draft a new one",
            field="document.version",
        )
    if policy.effective_from <= now:
        raise InvalidArgument(
            "EFFECTIVE_FROM_PASSED",
            "document.effective_from: must be in the future (no retroactive rules)",
            field="document.effective_from",
        )
    drafted = ev.PolicyDrafted(version=policy.version, policy_json=policy_json, reason=reason)
    drafted.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    return [drafted]


def approve_policy(
    record: PolicyRecord | None,
    policy_json: str,
    approver: common_pb2.Actor,
    reason: str,
    now: dt.datetime,
) -> list[Message]:
    """A different approver activates a draft from its effective_from on."""
    if record is None:
        raise NotFound("UNKNOWN_POLICY_VERSION", "version: no such policy draft", field="version")
    require_approver(approver)
    if record.status != DRAFT:
        raise FailedPrecondition(
            "POLICY_ALREADY_APPROVED",
            f"version: {record.version} is {record.status}",
            field="version",
        )
    if approver.id == record.drafted_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "actor.id: the approver must be a different person from the drafter",
            field="actor.id",
        )
    if record.effective_from <= now + APPROVAL_LEAD:
        raise FailedPrecondition(
            "EFFECTIVE_FROM_PASSED",
            f"version: {record.version} would take effect before every replica has it; "
            "draft a new version with a later effective_from",
            field="version",
        )
    published = ev.PolicyPublished(version=record.version, policy_json=policy_json)
    published.effective_from.FromDatetime(record.effective_from.astimezone(dt.UTC))
    approved = ev.PolicyApproved(
        version=record.version, reason=reason, drafted_by=record.drafted_by
    )
    return [approved, published]


# --------------------------------------------------------------------------------------------
# Emergency switches


@dataclass(frozen=True)
class Pause:
    reason: str
    actor_id: str
    since: dt.datetime


@dataclass(frozen=True)
class Switches:
    """What is paused right now; read by every VerifyItem."""

    campaign: Pause | None = None
    categories: Mapping[str, Pause] = field(default_factory=dict)


def pause_category(switches: Switches, policy: Policy, category: str, reason: str) -> list[Message]:
    if policy.category(category) is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY", "category: not a category of the policy in force", field="category"
        )
    if category in switches.categories:
        raise FailedPrecondition(
            "CATEGORY_ALREADY_PAUSED", f"category: {category} is paused already", field="category"
        )
    return [ev.CategoryPaused(category=category, reason=reason)]


def resume_category(switches: Switches, category: str, reason: str) -> list[Message]:
    if category not in switches.categories:
        raise FailedPrecondition(
            "CATEGORY_NOT_PAUSED", f"category: {category} is not paused", field="category"
        )
    return [ev.CategoryResumed(category=category, reason=reason)]


def pause_campaign(switches: Switches, reason: str) -> list[Message]:
    if switches.campaign is not None:
        raise FailedPrecondition("CAMPAIGN_ALREADY_PAUSED", "the campaign is paused already")
    return [ev.CampaignPaused(reason=reason)]


def resume_campaign(switches: Switches, reason: str) -> list[Message]:
    if switches.campaign is None:
        raise FailedPrecondition("CAMPAIGN_NOT_PAUSED", "the campaign is not paused")
    return [ev.CampaignResumed(reason=reason)]


# --------------------------------------------------------------------------------------------
# Merchants


def review_merchant(merchant_id: str, status: str, approve: bool, reason: str) -> list[Message]:
    if status != APPLIED:
        raise FailedPrecondition(
            "MERCHANT_ALREADY_REVIEWED",
            f"merchant_id: {merchant_id} is {status}",
            field="merchant_id",
        )
    return [ev.MerchantReviewed(merchant_id=merchant_id, approved=approve, reason=reason)]


def suspend_merchant(merchant_id: str, status: str, reason: str) -> list[Message]:
    if status == SUSPENDED:
        raise FailedPrecondition(
            "MERCHANT_ALREADY_SUSPENDED",
            f"merchant_id: {merchant_id} is suspended already",
            field="merchant_id",
        )
    if status != APPROVED:
        raise FailedPrecondition(
            "MERCHANT_NOT_APPROVED", f"merchant_id: {merchant_id} is {status}", field="merchant_id"
        )
    return [ev.MerchantSuspended(merchant_id=merchant_id, reason=reason)]


def reinstate_merchant(merchant_id: str, status: str, reason: str) -> list[Message]:
    if status != SUSPENDED:
        raise FailedPrecondition(
            "MERCHANT_NOT_SUSPENDED",
            f"merchant_id: {merchant_id} is {status}",
            field="merchant_id",
        )
    return [ev.MerchantReinstated(merchant_id=merchant_id, reason=reason)]


# --------------------------------------------------------------------------------------------
# Products and prices


def change_price(sku: str, status: str, old_fen: int, new_fen: int, reason: str) -> list[Message]:
    if status == DELISTED:
        raise FailedPrecondition("PRODUCT_DELISTED", f"sku: {sku} is delisted", field="sku")
    if old_fen == new_fen:
        raise FailedPrecondition(
            "PRICE_UNCHANGED",
            f"list_price_fen: {sku} already costs {old_fen} fen",
            field="list_price_fen",
        )
    return [
        ev.ProductPriceChanged(sku=sku, old_price_fen=old_fen, new_price_fen=new_fen, reason=reason)
    ]


def delist(sku: str, status: str, reason: str) -> list[Message]:
    if status == DELISTED:
        raise FailedPrecondition(
            "PRODUCT_ALREADY_DELISTED", f"sku: {sku} is delisted already", field="sku"
        )
    return [ev.ProductDelisted(sku=sku, reason=reason)]


def price_baseline(
    history: Sequence[tuple[dt.datetime, int]], now: dt.datetime, window_days: int
) -> int | None:
    """The time-weighted median list price over the last ``window_days`` (None: no history).

    ``history`` is (effective_at, price_fen), oldest first; each price holds until the next.
    Weighting by time is what makes a raise just before a sale stand out: a price set yesterday
    weighs one day against the months of the price before it, whereas a plain median of the
    recorded prices would count it as one of two. Only prices in force inside the window
    count; a product whose only price was set this instant has that price as its baseline.
    """
    if not history:
        return None
    start = now - dt.timedelta(days=window_days)
    weights: dict[int, int] = {}
    for i, (at, price) in enumerate(history):
        until = history[i + 1][0] if i + 1 < len(history) else now
        begin, end = max(at, start), min(until, now)
        if end > begin:
            micros = (end - begin) // dt.timedelta(microseconds=1)
            weights[price] = weights.get(price, 0) + micros
    if not weights:
        return history[-1][1]
    total = sum(weights.values())
    running = 0
    for price in sorted(weights):
        running += weights[price]
        if 2 * running >= total:
            return price
    raise AssertionError("unreachable: the cumulative weight reaches the total")


def price_limit(baseline_fen: int, tolerance_bp: int) -> int:
    """The highest acceptable unit price: the baseline plus the tolerance, rounded down."""
    return baseline_fen + apply_bp(baseline_fen, tolerance_bp, Rounding.DOWN)


# --------------------------------------------------------------------------------------------
# Units


def mask_reference(reference: str) -> str:
    """An order reference shown to another party: enough to find it, not to read it."""
    if len(reference) <= 6:
        return "*" * len(reference)
    return f"{reference[:2]}{'*' * (len(reference) - 6)}{reference[-4:]}"


# --------------------------------------------------------------------------------------------
# The item verdict


@dataclass(frozen=True)
class ItemFacts:
    """What the catalog knows about one SKU at verification time."""

    sku: str
    category: str
    grade: int  # 0 = no efficiency grade
    merchant_id: str
    merchant_status: str
    product_status: str
    price_history: tuple[tuple[dt.datetime, int], ...] = ()
    serial_order: str = ""  # the order holding the serial, if any
    serial_order_status: str = ""  # RESERVED or CAPTURED


@dataclass(frozen=True)
class ItemVerdict:
    eligible: bool
    reasons: tuple[str, ...]
    category: str
    grade: int
    merchant_id: str
    quote: Quote | None
    policy_version: str
    baseline_fen: int = 0
    price_limit_fen: int = 0
    serial_bound_order: str = ""

    @property
    def subsidy_fen(self) -> int:
        return self.quote.subsidy_fen if self.quote is not None and self.eligible else 0


def verdict(
    policy: Policy,
    facts: ItemFacts | None,
    switches: Switches,
    unit_price_fen: int,
    now: dt.datetime,
) -> ItemVerdict:
    """Every reason the item at this price is not eligible, or its subsidy, under ``policy``.

    Reasons come in a fixed order: UNKNOWN_SKU, CAMPAIGN_PAUSED, CATEGORY_PAUSED, the merchant,
    PRODUCT_DELISTED, the policy's quote reasons, PRICE_ABOVE_BASELINE, the serial.
    """
    reasons: list[str] = []
    if facts is None:
        if switches.campaign is not None:
            reasons.append(CAMPAIGN_PAUSED)
        return ItemVerdict(False, (UNKNOWN_SKU, *reasons), "", 0, "", None, policy.version)
    if switches.campaign is not None:
        reasons.append(CAMPAIGN_PAUSED)
    if facts.category in switches.categories:
        reasons.append(CATEGORY_PAUSED)
    if facts.merchant_status == SUSPENDED:
        reasons.append(MERCHANT_SUSPENDED)
    elif facts.merchant_status != APPROVED:
        reasons.append(MERCHANT_NOT_APPROVED)
    if facts.product_status != LISTED:
        reasons.append(PRODUCT_DELISTED)
    q = quote(policy, facts.category, facts.grade or None, unit_price_fen)
    reasons += q.reasons
    baseline = price_baseline(facts.price_history, now, policy.baseline_window_days)
    limit = price_limit(baseline, policy.price_tolerance_bp) if baseline is not None else 0
    if baseline is not None and unit_price_fen > limit:
        reasons.append(PRICE_ABOVE_BASELINE)
    masked = ""
    if facts.serial_order:
        masked = mask_reference(facts.serial_order)
        reasons.append(
            SERIAL_ALREADY_SUBSIDISED if facts.serial_order_status == CAPTURED else SERIAL_RESERVED
        )
    return ItemVerdict(
        eligible=not reasons and q.eligible,
        reasons=tuple(reasons),
        category=facts.category,
        grade=facts.grade,
        merchant_id=facts.merchant_id,
        quote=q,
        policy_version=policy.version,
        baseline_fen=baseline or 0,
        price_limit_fen=limit,
        serial_bound_order=masked,
    )
