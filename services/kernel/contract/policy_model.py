"""The policy model: one version of the campaign rules, the version in force, and the quote.

Every number the programme owner can change (rates, caps, ceilings, limits, quotas, windows)
lives in a policy document, never in code: the rules changed between 2024, 2025 and 2026 and
differ by city, and an order is always computed under the policy version that was in force
when it was reserved. This module is what code reads once a document is validated (by
:mod:`.policy_document` or :mod:`.policy_proto`); import it through :mod:`.policy`.

Pure: no I/O. Money is integer fen; percentages are integer basis points (1 bp = 0.01 %).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo

from services.kernel.contract.limits import MAX_GRADE, MAX_PRICE_FEN, MIN_GRADE, MIN_PRICE_FEN
from services.kernel.errors import FailedPrecondition, NotFound

BP_DENOMINATOR: Final = 10_000
# A claim window's "24:00": open to the end of the day.
MIDNIGHT: Final = dt.time.max

# Quote reason codes: machine-readable, stable, part of the checkout API.
UNKNOWN_CATEGORY: Final = "UNKNOWN_CATEGORY"
GRADE_NOT_ELIGIBLE: Final = "GRADE_NOT_ELIGIBLE"
NO_GRADE_NOT_ELIGIBLE: Final = "NO_GRADE_NOT_ELIGIBLE"
PRICE_ABOVE_CEILING: Final = "PRICE_ABOVE_CEILING"
INVALID_PRICE: Final = "INVALID_PRICE"
INVALID_GRADE: Final = "INVALID_GRADE"
QUOTE_REASONS: Final = frozenset(
    {
        UNKNOWN_CATEGORY,
        GRADE_NOT_ELIGIBLE,
        NO_GRADE_NOT_ELIGIBLE,
        PRICE_ABOVE_CEILING,
        INVALID_PRICE,
        INVALID_GRADE,
    }
)


class PolicyError(ValueError):
    """A policy document is malformed; ``path`` names the offending field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class Group(StrEnum):
    """Which programme a category belongs to (they are funded and reported separately)."""

    NATIONAL_APPLIANCE = "national_appliance"
    CITY_APPLIANCE = "city_appliance"
    DIGITAL = "digital"


class Rounding(StrEnum):
    """How a percentage of a price is rounded to whole fen (applied once per item)."""

    DOWN = "down"
    HALF_UP = "half_up"


class RefundRule(StrEnum):
    """What happens to a consumer's qualification when the subsidised order is refunded."""

    RESTORE = "restore"
    # Restored, but lockable only from the start of the next day in the campaign's time zone.
    RESTORE_NEXT_DAY = "restore_next_day"
    FORFEIT = "forfeit"


@dataclass(frozen=True, slots=True)
class Campaign:
    """The campaign a policy belongs to; ``area`` is a 6-digit administrative division code.
    ``regions`` are the division codes a claim's delivery or GPS region must lie inside (by
    default the area alone)."""

    name: str
    area: str
    regions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClaimWindow:
    """Daily wall-clock window in which qualifications can be claimed (opens < closes).
    ``closes`` is :data:`MIDNIGHT` for a window open to the end of the day ("24:00")."""

    opens: dt.time
    closes: dt.time
    timezone: str

    def is_open(self, at: dt.datetime) -> bool:
        """Whether claims are open at ``at`` (an aware time), read in the window's time zone."""
        local = at.astimezone(ZoneInfo(self.timezone)).time()
        return self.opens <= local and (self.closes == MIDNIGHT or local < self.closes)


@dataclass(frozen=True, slots=True)
class CategoryRule:
    """Subsidy rule for one product category.

    ``grades`` holds ``(grade, rate_bp)`` pairs for the eligible efficiency grades, ascending by
    grade (a tuple rather than a dict so the rule stays hashable); grades not listed are
    ineligible. ``no_grade_rate_bp`` is the rate for products without an efficiency grade
    (None: such products are ineligible). ``price_ceiling_fen`` None means no ceiling.
    """

    code: str
    name_zh: str
    name_en: str
    group: Group
    grades: tuple[tuple[int, int], ...]
    no_grade_rate_bp: int | None
    cap_fen: int
    price_ceiling_fen: int | None
    per_person_limit: int
    daily_quota: int

    @property
    def grade_rates(self) -> dict[int, int]:
        """The eligible grades and their rates as a fresh dict."""
        return dict(self.grades)

    def rate_bp_for(self, grade: int | None) -> int | None:
        """The rate for a product of ``grade`` (None: no grade), or None if it is ineligible."""
        if grade is None:
            return self.no_grade_rate_bp
        for eligible_grade, rate_bp in self.grades:
            if eligible_grade == grade:
                return rate_bp
        return None


class Split(StrEnum):
    """Which funding source pays each subsidy (``FundingRules.split``)."""

    # One source first, then the next: the policy's ``priority`` list, then the pool's other
    # sources in the order they first funded it.
    PRIORITY = "priority"
    # Every source in proportion to what it has funded (released) into the pool, in whole fen
    # by the largest remainder (ties: the source that funded the pool first); a source that
    # cannot pay its share refuses the order (SOURCE_EXHAUSTED): a co-funding ratio is kept,
    # never bent.
    PRO_RATA = "pro_rata"


# How long evidence may take when the policy does not say (versions published before the rule).
DEFAULT_EVIDENCE_DAYS = 30
MAX_EVIDENCE_DAYS = 366


class PaidAmount(StrEnum):
    """What a capture whose declared paid amount does not match the reservation meets
    (``FundingRules.paid_amount``): the paid amount plus the subsidy must be the reserved
    unit price, so the platform's declared price alone never decides the money."""

    # Captured, and the capture flagged (PAID_AMOUNT_MISMATCH / PAID_AMOUNT_MISSING on the
    # event and the reservation): what a policy published before this rule means, since its
    # captures were never checked.
    FLAG = "flag"
    # Refused (PAID_AMOUNT_MISMATCH, PAID_AMOUNT_MISSING): nothing is captured.
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class FundingRules:
    """How a campaign's budget is paid and watched (the policy's optional ``funding`` part).

    Every default is what a policy published before these rules meant, so old versions read
    the same: ``sources`` empty accepts any source a funding names; ``split`` PRIORITY with no
    ``priority`` list pays from the sources in the order they first funded the pool (one pool
    of money, as before); no alert thresholds; no sub-budgets.

    ``alert_thresholds_bp``: spent shares (ascending basis points) that raise one alert each,
    for the pool (of its funded amount) and for each category (of its sub-budget, or of the
    pool's funded amount when it has none). ``sub_budgets``: ``(category, share_bp)``, a
    category may hold or spend at most that share of the pool's funded amount.
    ``paid_amount``: a capture's declared paid amount that does not match is flagged (the
    default) or refused. ``evidence_days``: how long after its capture an order's delivery or
    activation evidence may take before the order is listed as overdue (default 30 days).
    """

    sources: tuple[str, ...] = ()
    split: Split = Split.PRIORITY
    priority: tuple[str, ...] = ()
    alert_thresholds_bp: tuple[int, ...] = ()
    sub_budgets: tuple[tuple[str, int], ...] = ()
    paid_amount: PaidAmount = PaidAmount.FLAG
    evidence_days: int = DEFAULT_EVIDENCE_DAYS

    def accepts(self, source: str) -> bool:
        """Whether a funding may name ``source`` (any, when the policy declares none)."""
        return not self.sources or source in self.sources

    def sub_budget_bp(self, category: str) -> int | None:
        """The category's cap as a share of the pool's funded amount, or None (no cap)."""
        for code, share_bp in self.sub_budgets:
            if code == category:
                return share_bp
        return None


@dataclass(frozen=True, slots=True)
class Supervision:
    """How fast supervision cases must be handled, and what operator activity opens one (the
    policy's optional ``supervision`` part; absent: these defaults).

    A case's first response (an assignment or a note) is due ``first_response_hours`` after it
    opened, its resolution ``resolution_hours`` after; ``override_limit`` overrides (lifted
    blocks, case restores and forfeits, reinstatements...) by one person within
    ``override_window_hours`` open an operator-activity case."""

    first_response_hours: int = 24
    resolution_hours: int = 7 * 24
    override_limit: int = 20
    override_window_hours: int = 24


@dataclass(frozen=True, slots=True)
class Policy:
    """One version of the campaign rules. Build it with ``load_policy``, ``policy_from_dict``
    or ``policy_from_proto`` (in :mod:`.policy`), which validate; the constructor does not."""

    version: str
    effective_from: dt.datetime
    campaign: Campaign
    rounding: Rounding
    price_tolerance_bp: int
    baseline_window_days: int
    claim_window: ClaimWindow
    qualification_validity_days: int
    reclaim_limit: int
    refund_rule: RefundRule
    categories: tuple[CategoryRule, ...]
    funding: FundingRules = FundingRules()
    supervision: Supervision = Supervision()

    def category(self, code: str) -> CategoryRule | None:
        """The rule for category ``code``, or None if the policy does not subsidise it."""
        for rule in self.categories:
            if rule.code == code:
                return rule
        return None

    @property
    def category_codes(self) -> tuple[str, ...]:
        """Category codes in policy order."""
        return tuple(rule.code for rule in self.categories)


@dataclass(frozen=True, slots=True)
class Quote:
    """The subsidy for one item under one policy version.

    ``rate_bp`` and ``cap_fen`` describe the rule that matches the category and grade (0 when
    none does); ``subsidy_fen`` is 0 whenever ``eligible`` is False, and ``reasons`` then lists
    every reason code that applies, in a fixed order.
    """

    eligible: bool
    subsidy_fen: int
    rate_bp: int
    cap_fen: int
    policy_version: str
    reasons: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# The version in force


def in_force(versions: Iterable[Policy], at: dt.datetime) -> Policy:
    """The version in force at ``at``: the one with the latest ``effective_from`` not after it.

    Two versions effective at the same instant are ordered by version string, so every
    service picks the same one. Raises FailedPrecondition ``NO_POLICY_IN_FORCE`` if none is.
    """
    started = [p for p in versions if p.effective_from <= at]
    if not started:
        raise FailedPrecondition("NO_POLICY_IN_FORCE", "no subsidy policy is in force")
    return max(started, key=lambda p: (p.effective_from, p.version))


def named_version(versions: Mapping[str, Policy], version: str) -> Policy:
    """The approved version named ``version`` (an order's, a pinned quote's).

    A version this set does not hold raises NotFound ``UNKNOWN_POLICY_VERSION``: computing
    under any other version instead would decide a refund or a subsidy by the wrong rules.
    """
    found = versions.get(version)
    if found is None:
        raise NotFound(
            "UNKNOWN_POLICY_VERSION",
            f"policy_version: no approved policy {version!r}",
            field="policy_version",
        )
    return found


# --------------------------------------------------------------------------------------------
# Arithmetic


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True is never a sensible amount, grade or count.
    return isinstance(value, int) and not isinstance(value, bool)


def apply_bp(amount_fen: int, bp: int, rounding: Rounding) -> int:
    """``amount_fen * bp / 10000`` rounded to whole fen, in integer arithmetic only.

    Both arguments must be non-negative. ``DOWN`` floors; ``HALF_UP`` rounds halves up.
    """
    if amount_fen < 0 or bp < 0:
        raise ValueError("apply_bp: amount and rate must be non-negative")
    numerator = amount_fen * bp
    if rounding is Rounding.DOWN:
        return numerator // BP_DENOMINATOR
    # floor(x/d + 1/2) == (2x + d) // 2d, exact for integers.
    return (2 * numerator + BP_DENOMINATOR) // (2 * BP_DENOMINATOR)


def quote(policy: Policy, category_code: str, grade: int | None, price_fen: int) -> Quote:
    """Compute the subsidy for one item of ``category_code`` with efficiency ``grade``
    (None: the product has no grade) at final price ``price_fen``.

    Eligible items get ``min(cap, round(price * rate / 10000))`` with the policy's rounding
    applied once. Otherwise the subsidy is 0 and every applicable reason is listed, in the
    order INVALID_PRICE, INVALID_GRADE, UNKNOWN_CATEGORY, GRADE_NOT_ELIGIBLE /
    NO_GRADE_NOT_ELIGIBLE, PRICE_ABOVE_CEILING.
    """
    reasons: list[str] = []
    price_ok = _is_int(price_fen) and MIN_PRICE_FEN <= price_fen <= MAX_PRICE_FEN
    if not price_ok:
        reasons.append(INVALID_PRICE)
    grade_ok = grade is None or (_is_int(grade) and MIN_GRADE <= grade <= MAX_GRADE)
    if not grade_ok:
        reasons.append(INVALID_GRADE)

    rule = policy.category(category_code) if isinstance(category_code, str) else None
    if rule is None:
        reasons.append(UNKNOWN_CATEGORY)
        return Quote(False, 0, 0, 0, policy.version, tuple(reasons))

    rate_bp = rule.rate_bp_for(grade) if grade_ok else None
    if grade_ok and rate_bp is None:
        reasons.append(NO_GRADE_NOT_ELIGIBLE if grade is None else GRADE_NOT_ELIGIBLE)
    ceiling = rule.price_ceiling_fen
    if price_ok and ceiling is not None and price_fen > ceiling:
        reasons.append(PRICE_ABOVE_CEILING)

    if reasons or rate_bp is None:
        return Quote(False, 0, rate_bp or 0, rule.cap_fen, policy.version, tuple(reasons))
    subsidy_fen = min(rule.cap_fen, apply_bp(price_fen, rate_bp, policy.rounding))
    return Quote(True, subsidy_fen, rate_bp, rule.cap_fen, policy.version, ())
