"""Subsidy policy: the campaign rules as versioned data, the version in force, and the quote.

Every number the programme owner can change (rates, caps, ceilings, limits, quotas, windows)
lives in a policy document, never in code: the rules changed between 2024, 2025 and 2026 and
differ by city, and an order is always computed under the policy version that was in force
when it was reserved.

The document has three forms, and this module converts between them with one validation:
the YAML file people edit, the ``subsidy.v1.Policy`` message events carry (the contract, in
``proto/subsidy/v1/policy.proto``), and the :class:`Policy` model code reads. Both catalog and
eligibility pick "the version in force at T" with :func:`in_force` and look a named version up
with :func:`named_version` (an unknown one is an error, never another version).

This file is longer than most (about 700 lines) on purpose: it is the whole policy contract in
one place (model, validation, conversions, arithmetic), so no rule is read in two files.
Everything here is pure except reading a policy file. Money is integer fen; percentages are
integer basis points (1 bp = 0.01 %).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from services.contract.limits import MAX_GRADE as MAX_GRADE
from services.contract.limits import MAX_PRICE_FEN as MAX_PRICE_FEN
from services.contract.limits import MIN_GRADE as MIN_GRADE
from services.contract.limits import MIN_PRICE_FEN as MIN_PRICE_FEN
from services.kernel.errors import FailedPrecondition, NotFound
from subsidy.v1 import events_pb2, policy_pb2

BP_DENOMINATOR: Final = 10_000

DEFAULT_POLICY_RESOURCE: Final = "shenzhen-2025.yaml"

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
    FORFEIT = "forfeit"


@dataclass(frozen=True, slots=True)
class Campaign:
    """The campaign a policy belongs to; ``area`` is a 6-digit administrative division code."""

    name: str
    area: str


@dataclass(frozen=True, slots=True)
class ClaimWindow:
    """Daily wall-clock window in which qualifications can be claimed (opens < closes)."""

    opens: dt.time
    closes: dt.time
    timezone: str


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


@dataclass(frozen=True, slots=True)
class Policy:
    """One version of the campaign rules. Build it with :func:`load_policy` or
    :func:`policy_from_dict`, which validate; the constructor does not."""

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


# --------------------------------------------------------------------------------------------
# Loading and validation

_VERSION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AREA_RE: Final = re.compile(r"[1-9][0-9]{5}")
_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HHMM_RE: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_GRADE_KEY_RE: Final = re.compile(r"[1-5]")
_MAX_TEXT: Final = 200

_TOP_REQUIRED: Final = (
    "version",
    "effective_from",
    "campaign",
    "price_tolerance_bp",
    "baseline_window_days",
    "claim_window",
    "qualification_validity_days",
    "reclaim_limit",
    "refund_rule",
    "categories",
)
_TOP_OPTIONAL: Final = ("rounding",)
_CAMPAIGN_KEYS: Final = ("name", "area")
_CLAIM_WINDOW_KEYS: Final = ("opens", "closes", "timezone")
_CATEGORY_KEYS: Final = (
    "code",
    "name_zh",
    "name_en",
    "group",
    "grades",
    "no_grade_rate_bp",
    "cap_fen",
    "price_ceiling_fen",
    "per_person_limit",
    "daily_quota",
)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(
    value: object, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, "must be a mapping")
    allowed = set(required) | set(optional)
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(path, f"keys must be strings, got {key!r}")
        if key not in allowed:
            raise PolicyError(_join(path, key), "unknown key")
    for key in required:
        if key not in value:
            raise PolicyError(_join(path, key), "is required")
    return value


def _text(value: object, path: str, *, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT:
        raise PolicyError(path, f"must be a non-empty string of at most {_MAX_TEXT} characters")
    if value != value.strip():
        raise PolicyError(path, "must not have leading or trailing whitespace")
    if pattern is not None and not pattern.fullmatch(value):
        raise PolicyError(path, f"must match {pattern.pattern}")
    return value


def _int(value: object, path: str, *, minimum: int = 0) -> int:
    # Floats are rejected on purpose: money and counts are exact integers.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive" if minimum == 1 else f">= {minimum}"
        raise PolicyError(path, f"must be a {kind} integer")
    return value


def _bp(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BP_DENOMINATOR:
        raise PolicyError(path, f"must be an integer in 0..{BP_DENOMINATOR} (basis points)")
    return value


_E = TypeVar("_E", bound=StrEnum)


def _enum(value: object, path: str, enum: type[_E]) -> _E:
    choices = ", ".join(member.value for member in enum)
    if not isinstance(value, str):
        raise PolicyError(path, f"must be one of: {choices}")
    try:
        return enum(value)
    except ValueError:
        raise PolicyError(path, f"unknown value {value!r}; must be one of: {choices}") from None


def _datetime(value: object, path: str) -> dt.datetime:
    problem = "must be an ISO 8601 datetime with a UTC offset, e.g. 2025-01-01T00:00:00+08:00"
    parsed: dt.datetime | None = None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise PolicyError(path, problem)
    return parsed


def _hhmm(value: object, path: str) -> dt.time:
    if _is_int(value):
        # YAML 1.1 reads an unquoted 10:00 as the base-60 integer 600.
        raise PolicyError(path, 'must be a "HH:MM" string (quote it in YAML)')
    match = _HHMM_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise PolicyError(path, 'must be a "HH:MM" string (00:00..23:59)')
    return dt.time(int(match[1]), int(match[2]))


def _timezone(value: object, path: str) -> str:
    name = _text(value, path)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PolicyError(path, f"unknown IANA time zone {name!r}") from None
    return name


def _grades(value: object, path: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, "must be a mapping of grade (1..5) to rate_bp")
    rates: dict[int, int] = {}
    for key, rate in value.items():
        # JSON turns integer keys into strings, so the canonical digit string is accepted too.
        if not isinstance(key, bool) and isinstance(key, int) and MIN_GRADE <= key <= MAX_GRADE:
            grade = key
        elif isinstance(key, str) and _GRADE_KEY_RE.fullmatch(key):
            grade = int(key)
        else:
            raise PolicyError(
                f"{path}[{key!r}]", f"grade must be an integer {MIN_GRADE}..{MAX_GRADE}"
            )
        if grade in rates:
            raise PolicyError(f"{path}[{grade}]", "duplicate grade")
        rates[grade] = _bp(rate, f"{path}[{grade}]")
    return tuple(sorted(rates.items()))


def _category(value: object, path: str) -> CategoryRule:
    data = _mapping(value, path, _CATEGORY_KEYS)
    no_grade = data["no_grade_rate_bp"]
    ceiling = data["price_ceiling_fen"]
    return CategoryRule(
        code=_text(data["code"], f"{path}.code", pattern=_CODE_RE),
        name_zh=_text(data["name_zh"], f"{path}.name_zh"),
        name_en=_text(data["name_en"], f"{path}.name_en"),
        group=_enum(data["group"], f"{path}.group", Group),
        grades=_grades(data["grades"], f"{path}.grades"),
        no_grade_rate_bp=None if no_grade is None else _bp(no_grade, f"{path}.no_grade_rate_bp"),
        cap_fen=_int(data["cap_fen"], f"{path}.cap_fen"),
        price_ceiling_fen=(
            None if ceiling is None else _int(ceiling, f"{path}.price_ceiling_fen", minimum=1)
        ),
        per_person_limit=_int(data["per_person_limit"], f"{path}.per_person_limit", minimum=1),
        daily_quota=_int(data["daily_quota"], f"{path}.daily_quota"),
    )


def _categories(value: object, path: str) -> tuple[CategoryRule, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise PolicyError(path, "must be a non-empty list")
    rules: list[CategoryRule] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        rule = _category(item, item_path)
        if rule.code in first_index:
            raise PolicyError(
                f"{item_path}.code",
                f"duplicate category code {rule.code!r} (first at index {first_index[rule.code]})",
            )
        first_index[rule.code] = index
        rules.append(rule)
    return tuple(rules)


def _claim_window(value: object, path: str) -> ClaimWindow:
    data = _mapping(value, path, _CLAIM_WINDOW_KEYS)
    opens = _hhmm(data["opens"], f"{path}.opens")
    closes = _hhmm(data["closes"], f"{path}.closes")
    if closes <= opens:
        raise PolicyError(f"{path}.closes", "must be later than opens on the same day")
    return ClaimWindow(opens, closes, _timezone(data["timezone"], f"{path}.timezone"))


def _campaign(value: object, path: str) -> Campaign:
    data = _mapping(value, path, _CAMPAIGN_KEYS)
    return Campaign(
        name=_text(data["name"], f"{path}.name"),
        area=_text(data["area"], f"{path}.area", pattern=_AREA_RE),
    )


def policy_from_dict(data: object) -> Policy:
    """Validate a plain policy document (as parsed from YAML or JSON) and build the Policy.

    Raises :class:`PolicyError` naming the first offending field path, e.g.
    ``categories[3].cap_fen: must be a non-negative integer``.
    """
    top = _mapping(data, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    return Policy(
        version=_text(top["version"], "version", pattern=_VERSION_RE),
        effective_from=_datetime(top["effective_from"], "effective_from"),
        campaign=_campaign(top["campaign"], "campaign"),
        rounding=_enum(top.get("rounding", Rounding.DOWN.value), "rounding", Rounding),
        price_tolerance_bp=_bp(top["price_tolerance_bp"], "price_tolerance_bp"),
        baseline_window_days=_int(top["baseline_window_days"], "baseline_window_days", minimum=1),
        claim_window=_claim_window(top["claim_window"], "claim_window"),
        qualification_validity_days=_int(
            top["qualification_validity_days"], "qualification_validity_days", minimum=1
        ),
        reclaim_limit=_int(top["reclaim_limit"], "reclaim_limit"),
        refund_rule=_enum(top["refund_rule"], "refund_rule", RefundRule),
        categories=_categories(top["categories"], "categories"),
    )


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The policy as a plain, JSON-safe dict that :func:`policy_from_dict` accepts back.

    Deterministic: fixed key order, categories in policy order, grade keys as ascending digit
    strings (JSON object keys are strings), datetimes in ISO 8601, times as "HH:MM".
    """
    window = policy.claim_window
    return {
        "version": policy.version,
        "effective_from": policy.effective_from.isoformat(),
        "campaign": {"name": policy.campaign.name, "area": policy.campaign.area},
        "rounding": policy.rounding.value,
        "price_tolerance_bp": policy.price_tolerance_bp,
        "baseline_window_days": policy.baseline_window_days,
        "claim_window": {
            "opens": window.opens.strftime("%H:%M"),
            "closes": window.closes.strftime("%H:%M"),
            "timezone": window.timezone,
        },
        "qualification_validity_days": policy.qualification_validity_days,
        "reclaim_limit": policy.reclaim_limit,
        "refund_rule": policy.refund_rule.value,
        "categories": [
            {
                "code": rule.code,
                "name_zh": rule.name_zh,
                "name_en": rule.name_en,
                "group": rule.group.value,
                "grades": {str(grade): rate for grade, rate in rule.grades},
                "no_grade_rate_bp": rule.no_grade_rate_bp,
                "cap_fen": rule.cap_fen,
                "price_ceiling_fen": rule.price_ceiling_fen,
                "per_person_limit": rule.per_person_limit,
                "daily_quota": rule.daily_quota,
            }
            for rule in policy.categories
        ],
    }


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and leaves timestamps as strings.

    PyYAML silently keeps the last of duplicate keys, which would hide an edit mistake in a
    policy; and timestamps stay strings so YAML and JSON documents validate the same way.
    """


_PolicyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_unique_mapping(loader: _PolicyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = f"line {key_node.start_mark.line + 1}"
        try:
            duplicate = key in result
        except TypeError:
            raise PolicyError(line, "mapping keys must be scalars") from None
        if duplicate:
            raise PolicyError(line, f"duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_PolicyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _parse_yaml(text: str) -> object:
    try:
        # yaml.load is safe here: _PolicyLoader is a SafeLoader subclass.
        return yaml.load(text, Loader=_PolicyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(where, f"invalid YAML: {problem}") from None


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and text.strip().endswith((".yaml", ".yml"))


def load_policy(source: str | PathLike[str]) -> Policy:
    """Load and validate a policy from a file path or from YAML text.

    A ``PathLike``, or a one-line ``str`` ending in ``.yaml``/``.yml``, is read as a UTF-8 file
    (OSError propagates); any other ``str`` is parsed as the YAML document itself.
    """
    if isinstance(source, PathLike) or _looks_like_path(source):
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = source
    return policy_from_dict(_parse_yaml(text))


def policy_from_text(text: str) -> Policy:
    """Validate a policy document given as YAML or JSON text (JSON is YAML).

    Unlike :func:`load_policy`, never treats its argument as a file path: use it for
    documents that arrive over the network.
    """
    return policy_from_dict(_parse_yaml(text))


def policy_json(policy: Policy) -> str:
    """The canonical JSON form (read models, GetPolicy): sorted keys, UTF-8 text kept as is."""
    return json.dumps(policy_to_dict(policy), sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# The contract: the subsidy.v1.Policy message

_PB = policy_pb2.Policy
_ROUNDING_PB: Final = {Rounding.DOWN: _PB.ROUNDING_DOWN, Rounding.HALF_UP: _PB.ROUNDING_HALF_UP}
_REFUND_PB: Final = {
    RefundRule.RESTORE: _PB.REFUND_RULE_RESTORE,
    RefundRule.FORFEIT: _PB.REFUND_RULE_FORFEIT,
}
_GROUP_PB: Final = {
    Group.NATIONAL_APPLIANCE: policy_pb2.CategoryRule.GROUP_NATIONAL_APPLIANCE,
    Group.CITY_APPLIANCE: policy_pb2.CategoryRule.GROUP_CITY_APPLIANCE,
    Group.DIGITAL: policy_pb2.CategoryRule.GROUP_DIGITAL,
}


def _enum_word(mapping: Mapping[_E, int], number: int) -> str:
    # UNSPECIFIED, or a number this code does not know, becomes "" and is refused by _enum.
    return next((member.value for member, n in mapping.items() if n == number), "")


def policy_to_proto(policy: Policy) -> policy_pb2.Policy:
    """The policy as the ``subsidy.v1.Policy`` message events carry (exact: it converts back
    to an equal Policy, with ``effective_from`` in the UTC offset it was written in)."""
    offset = policy.effective_from.utcoffset() or dt.timedelta(0)
    message = policy_pb2.Policy(
        version=policy.version,
        effective_from_utc_offset_seconds=int(offset.total_seconds()),
        campaign=policy_pb2.Campaign(name=policy.campaign.name, area=policy.campaign.area),
        rounding=_ROUNDING_PB[policy.rounding],
        price_tolerance_bp=policy.price_tolerance_bp,
        baseline_window_days=policy.baseline_window_days,
        claim_window=policy_pb2.ClaimWindow(
            opens=policy.claim_window.opens.strftime("%H:%M"),
            closes=policy.claim_window.closes.strftime("%H:%M"),
            timezone=policy.claim_window.timezone,
        ),
        qualification_validity_days=policy.qualification_validity_days,
        reclaim_limit=policy.reclaim_limit,
        refund_rule=_REFUND_PB[policy.refund_rule],
    )
    message.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    for rule in policy.categories:
        part = message.categories.add(
            code=rule.code,
            name_zh=rule.name_zh,
            name_en=rule.name_en,
            group=_GROUP_PB[rule.group],
            grades=[policy_pb2.GradeRate(grade=g, rate_bp=r) for g, r in rule.grades],
            cap_fen=rule.cap_fen,
            per_person_limit=rule.per_person_limit,
            daily_quota=rule.daily_quota,
        )
        if rule.no_grade_rate_bp is not None:
            part.no_grade_rate_bp = rule.no_grade_rate_bp
        if rule.price_ceiling_fen is not None:
            part.price_ceiling_fen = rule.price_ceiling_fen
    return message


def _proto_document(message: policy_pb2.Policy) -> dict[str, object]:
    """The message as the plain document :func:`policy_from_dict` validates."""
    if not message.HasField("effective_from"):
        raise PolicyError("effective_from", "is required")
    try:
        zone = dt.timezone(dt.timedelta(seconds=message.effective_from_utc_offset_seconds))
    except ValueError:
        raise PolicyError(
            "effective_from_utc_offset_seconds", "must be strictly between -24 h and +24 h"
        ) from None
    categories: list[dict[str, object]] = []
    for index, rule in enumerate(message.categories):
        grades: dict[int, int] = {}
        for rate in rule.grades:
            if rate.grade in grades:  # a mapping in YAML; a repeated field could hold one twice
                raise PolicyError(f"categories[{index}].grades[{rate.grade}]", "duplicate grade")
            grades[rate.grade] = rate.rate_bp
        categories.append(
            {
                "code": rule.code,
                "name_zh": rule.name_zh,
                "name_en": rule.name_en,
                "group": _enum_word(_GROUP_PB, rule.group),
                "grades": grades,
                "no_grade_rate_bp": (
                    rule.no_grade_rate_bp if rule.HasField("no_grade_rate_bp") else None
                ),
                "cap_fen": rule.cap_fen,
                "price_ceiling_fen": (
                    rule.price_ceiling_fen if rule.HasField("price_ceiling_fen") else None
                ),
                "per_person_limit": rule.per_person_limit,
                "daily_quota": rule.daily_quota,
            }
        )
    return {
        "version": message.version,
        "effective_from": message.effective_from.ToDatetime(tzinfo=dt.UTC).astimezone(zone),
        "campaign": {"name": message.campaign.name, "area": message.campaign.area},
        "rounding": _enum_word(_ROUNDING_PB, message.rounding),
        "price_tolerance_bp": message.price_tolerance_bp,
        "baseline_window_days": message.baseline_window_days,
        "claim_window": {
            "opens": message.claim_window.opens,
            "closes": message.claim_window.closes,
            "timezone": message.claim_window.timezone,
        },
        "qualification_validity_days": message.qualification_validity_days,
        "reclaim_limit": message.reclaim_limit,
        "refund_rule": _enum_word(_REFUND_PB, message.refund_rule),
        "categories": categories,
    }


def policy_from_proto(message: policy_pb2.Policy) -> Policy:
    """Validate a ``subsidy.v1.Policy`` message exactly as a YAML document and build the Policy.

    Raises :class:`PolicyError` naming the first offending field, e.g. ``rounding`` for an
    enum left at UNSPECIFIED or ``categories[3].cap_fen``.
    """
    return policy_from_dict(_proto_document(message))


def policy_of(event: events_pb2.PolicyPublished | events_pb2.PolicyDrafted) -> Policy:
    """The policy an event carries: its ``policy`` message, or, in events written before the
    policy had a message of its own, its canonical JSON ``policy_json``."""
    if event.HasField("policy"):
        return policy_from_proto(event.policy)
    return policy_from_dict(json.loads(event.policy_json))


@cache
def default_policy() -> Policy:
    """The policy shipped with the package: Shenzhen 2025 rules (cached; Policy is immutable)."""
    resource = resources.files("services.contract.policies").joinpath(DEFAULT_POLICY_RESOURCE)
    return policy_from_dict(_parse_yaml(resource.read_text(encoding="utf-8")))
