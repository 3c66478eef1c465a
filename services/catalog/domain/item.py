"""The item verdict: every reason an item at a price is not eligible, or its subsidy.

Pure: the facts (the product, its merchant, its prices, the order holding its serial) are read
by the handler in one query; the policy and the switches come from memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from services.kernel.contract.policy import Policy, Quote, Rounding, apply_bp, quote
from services.kernel.errors import InvalidArgument

from .common import APPROVED, CAPTURED, LISTED, SUSPENDED
from .switches import Switches

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


def mask_reference(reference: str) -> str:
    """An order reference shown to another party: enough to find it, not to read it."""
    if len(reference) <= 6:
        return "*" * len(reference)
    return f"{reference[:2]}{'*' * (len(reference) - 6)}{reference[-4:]}"


def quote_category(policy: Policy, category: str, grade: int, price_fen: int) -> Quote:
    """A quote for a category the policy has (Quote asks about a category, not an item: one
    the policy does not subsidise is a bad request, not an ineligible item)."""
    if policy.category(category) is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY",
            f"category: {policy.version} has no category {category!r}",
            field="category",
        )
    return quote(policy, category, grade or None, price_fen)


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
