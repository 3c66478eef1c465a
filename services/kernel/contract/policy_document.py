"""The policy as a document: the YAML file people edit, its validation, and its JSON form.

One validation serves every form of the document: a YAML file, YAML or JSON text from the
network, and the ``subsidy.v1.Policy`` message (:mod:`.policy_proto` turns it into the same
plain document first). An error names the offending field path. Import it through
:mod:`.policy`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from services.kernel.contract.circumstances import REGION_RE
from services.kernel.contract.limits import (
    MAX_CAP_FEN,
    MAX_GRADE,
    MAX_POLICY_COUNT,
    MAX_POLICY_DAYS,
    MAX_PRICE_CEILING_FEN,
    MIN_GRADE,
    MIN_PRICE_FEN,
)
from services.kernel.contract.policy_model import (
    BP_DENOMINATOR,
    DEFAULT_EVIDENCE_DAYS,
    MAX_EVIDENCE_DAYS,
    MIDNIGHT,
    Campaign,
    CategoryRule,
    ClaimWindow,
    FundingRules,
    Group,
    PaidAmount,
    Policy,
    PolicyError,
    RefundRule,
    Rounding,
    Split,
    Supervision,
)

DEFAULT_POLICY_RESOURCE: Final = "shenzhen-2025.yaml"


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
_TOP_OPTIONAL: Final = ("rounding", "funding", "supervision")
_SUPERVISION_KEYS: Final = (
    "first_response_hours",
    "resolution_hours",
    "override_limit",
    "override_window_hours",
)
_FUNDING_KEYS: Final = (
    "sources",
    "split",
    "priority",
    "alert_thresholds_bp",
    "sub_budgets_bp",
    "paid_amount",
    "evidence_days",
)
_SOURCE_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MAX_SOURCES: Final = 20
MAX_THRESHOLDS: Final = 20
_CAMPAIGN_KEYS: Final = ("name", "area")
_CAMPAIGN_OPTIONAL: Final = ("regions",)
MAX_REGIONS: Final = 1000
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


def _int(value: object, path: str, *, minimum: int = 0, maximum: int, unit: str = "") -> int:
    """An integer in ``minimum..maximum``: every number of a policy is bounded, so that no
    quote, budget or report computed from it can leave int64 (or int32 in the proto)."""
    # Floats are rejected on purpose: money and counts are exact integers.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive" if minimum == 1 else f">= {minimum}"
        raise PolicyError(path, f"must be a {kind} integer")
    if value > maximum:
        raise PolicyError(path, f"must be at most {maximum}{unit}, got {value}")
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


def _hhmm(value: object, path: str, *, midnight: bool = False) -> dt.time:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 10:00 as the base-60 integer 600.
        raise PolicyError(path, 'must be a "HH:MM" string (quote it in YAML)')
    if midnight and value == "24:00":
        return MIDNIGHT
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
        cap_fen=_int(data["cap_fen"], f"{path}.cap_fen", maximum=MAX_CAP_FEN, unit=" fen"),
        price_ceiling_fen=(
            None
            if ceiling is None
            else _int(
                ceiling,
                f"{path}.price_ceiling_fen",
                minimum=MIN_PRICE_FEN,
                maximum=MAX_PRICE_CEILING_FEN,
                unit=" fen",
            )
        ),
        per_person_limit=_int(
            data["per_person_limit"],
            f"{path}.per_person_limit",
            minimum=1,
            maximum=MAX_POLICY_COUNT,
        ),
        daily_quota=_int(data["daily_quota"], f"{path}.daily_quota", maximum=MAX_POLICY_COUNT),
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
    closes = _hhmm(data["closes"], f"{path}.closes", midnight=True)
    if closes <= opens:
        raise PolicyError(f"{path}.closes", "must be later than opens on the same day")
    return ClaimWindow(opens, closes, _timezone(data["timezone"], f"{path}.timezone"))


def _campaign(value: object, path: str) -> Campaign:
    data = _mapping(value, path, _CAMPAIGN_KEYS, _CAMPAIGN_OPTIONAL)
    area = _text(data["area"], f"{path}.area", pattern=_AREA_RE)
    return Campaign(
        name=_text(data["name"], f"{path}.name"),
        area=area,
        regions=_regions(data.get("regions", [area]), f"{path}.regions"),
    )


def _regions(value: object, path: str) -> tuple[str, ...]:
    """The division codes claims must come from: 6-digit county codes, or 9/12-digit township
    and village codes, at least one, no duplicates."""
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_REGIONS:
        raise PolicyError(path, f"must be a list of 1..{MAX_REGIONS} division codes")
    codes: list[str] = []
    for index, code in enumerate(value):
        text = _text(code, f"{path}[{index}]", pattern=REGION_RE)
        if text in codes:
            raise PolicyError(f"{path}[{index}]", f"duplicate region {text!r}")
        codes.append(text)
    return tuple(codes)


def _codes(value: object, path: str, *, maximum: int) -> tuple[str, ...]:
    """A list of distinct source codes (lower-case letters, digits, ``-`` and ``_``)."""
    if not isinstance(value, list | tuple) or len(value) > maximum:
        raise PolicyError(path, f"must be a list of at most {maximum} source codes")
    codes: list[str] = []
    for index, code in enumerate(value):
        text = _text(code, f"{path}[{index}]", pattern=_SOURCE_RE)
        if text in codes:
            raise PolicyError(f"{path}[{index}]", f"duplicate source {text!r}")
        codes.append(text)
    return tuple(codes)


def _thresholds(value: object, path: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_THRESHOLDS:
        raise PolicyError(path, f"must be a list of at most {MAX_THRESHOLDS} basis points")
    found = [_bp(t, f"{path}[{i}]") for i, t in enumerate(value)]
    for i, t in enumerate(found):
        if t == 0:
            raise PolicyError(f"{path}[{i}]", "must be 1..10000 basis points")
        if i and t <= found[i - 1]:
            raise PolicyError(f"{path}[{i}]", "thresholds must be strictly ascending")
    return tuple(found)


def _sub_budgets(
    value: object, path: str, categories: tuple[CategoryRule, ...]
) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, "must be a mapping of category code to share_bp")
    known = {rule.code for rule in categories}
    shares: list[tuple[str, int]] = []
    for code, share in value.items():
        if not isinstance(code, str) or code not in known:
            raise PolicyError(f"{path}[{code!r}]", "is not a category of this policy")
        share_bp = _bp(share, f"{path}.{code}")
        if share_bp == 0:
            raise PolicyError(f"{path}.{code}", "must be 1..10000 basis points")
        shares.append((code, share_bp))
    order = {rule.code: i for i, rule in enumerate(categories)}
    return tuple(sorted(shares, key=lambda s: order[s[0]]))  # policy order: one canonical form


def _funding(value: object, path: str, categories: tuple[CategoryRule, ...]) -> FundingRules:
    """The optional ``funding`` part; every key is optional (see FundingRules' defaults)."""
    data = _mapping(value, path, (), _FUNDING_KEYS)
    sources = _codes(data.get("sources", []), f"{path}.sources", maximum=MAX_SOURCES)
    split = _enum(data.get("split", Split.PRIORITY.value), f"{path}.split", Split)
    priority = _codes(data.get("priority", []), f"{path}.priority", maximum=MAX_SOURCES)
    if priority and split is not Split.PRIORITY:
        raise PolicyError(f"{path}.priority", "only with split: priority")
    for index, code in enumerate(priority):
        if sources and code not in sources:
            raise PolicyError(f"{path}.priority[{index}]", f"{code!r} is not one of the sources")
    return FundingRules(
        sources=sources,
        split=split,
        priority=priority,
        alert_thresholds_bp=_thresholds(
            data.get("alert_thresholds_bp", []), f"{path}.alert_thresholds_bp"
        ),
        sub_budgets=_sub_budgets(
            data.get("sub_budgets_bp", {}), f"{path}.sub_budgets_bp", categories
        ),
        paid_amount=_enum(
            data.get("paid_amount", PaidAmount.FLAG.value), f"{path}.paid_amount", PaidAmount
        ),
        evidence_days=_int(
            data.get("evidence_days", DEFAULT_EVIDENCE_DAYS),
            f"{path}.evidence_days",
            minimum=1,
            maximum=MAX_EVIDENCE_DAYS,
            unit=" days",
        ),
    )


def funding_to_dict(rules: FundingRules) -> dict[str, Any]:
    """The ``funding`` part as a plain document (every key, fixed order; ``paid_amount`` and
    ``evidence_days`` only when not the default, so versions published before them keep their
    document)."""
    document: dict[str, Any] = {
        "sources": list(rules.sources),
        "split": rules.split.value,
        "priority": list(rules.priority),
        "alert_thresholds_bp": list(rules.alert_thresholds_bp),
        "sub_budgets_bp": dict(rules.sub_budgets),
    }
    if rules.paid_amount is not PaidAmount.FLAG:
        document["paid_amount"] = rules.paid_amount.value
    if rules.evidence_days != DEFAULT_EVIDENCE_DAYS:
        document["evidence_days"] = rules.evidence_days
    return document


def _supervision(value: object, path: str) -> Supervision:
    """The optional ``supervision`` part; every key is optional (see Supervision's defaults)."""
    data = _mapping(value, path, (), _SUPERVISION_KEYS)
    default = Supervision()

    def hours(key: str, maximum: int) -> int:
        return _int(
            data.get(key, getattr(default, key)),
            f"{path}.{key}",
            minimum=1,
            maximum=maximum,
            unit=" hours",
        )

    first = hours("first_response_hours", 720)
    resolution = hours("resolution_hours", 8760)
    if resolution < first:
        raise PolicyError(f"{path}.resolution_hours", "must not be before the first response")
    return Supervision(
        first_response_hours=first,
        resolution_hours=resolution,
        override_limit=_int(
            data.get("override_limit", default.override_limit),
            f"{path}.override_limit",
            minimum=1,
            maximum=10_000,
        ),
        override_window_hours=hours("override_window_hours", 720),
    )


def supervision_to_dict(rules: Supervision) -> dict[str, Any]:
    """The ``supervision`` part as a plain document (every key, fixed order)."""
    return {key: getattr(rules, key) for key in _SUPERVISION_KEYS}


def hhmm_text(value: dt.time) -> str:
    """A window time as a document writes it ("24:00" for the end of the day)."""
    return "24:00" if value == MIDNIGHT else value.strftime("%H:%M")


def policy_from_dict(data: object) -> Policy:
    """Validate a plain policy document (as parsed from YAML or JSON) and build the Policy.

    Raises :class:`PolicyError` naming the first offending field path, e.g.
    ``categories[3].cap_fen: must be a non-negative integer``.
    """
    top = _mapping(data, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    categories = _categories(top["categories"], "categories")
    return Policy(
        version=_text(top["version"], "version", pattern=_VERSION_RE),
        effective_from=_datetime(top["effective_from"], "effective_from"),
        campaign=_campaign(top["campaign"], "campaign"),
        rounding=_enum(top.get("rounding", Rounding.DOWN.value), "rounding", Rounding),
        price_tolerance_bp=_bp(top["price_tolerance_bp"], "price_tolerance_bp"),
        baseline_window_days=_int(
            top["baseline_window_days"],
            "baseline_window_days",
            minimum=1,
            maximum=MAX_POLICY_DAYS,
            unit=" days",
        ),
        claim_window=_claim_window(top["claim_window"], "claim_window"),
        qualification_validity_days=_int(
            top["qualification_validity_days"],
            "qualification_validity_days",
            minimum=1,
            maximum=MAX_POLICY_DAYS,
            unit=" days",
        ),
        reclaim_limit=_int(top["reclaim_limit"], "reclaim_limit", maximum=MAX_POLICY_COUNT),
        refund_rule=_enum(top["refund_rule"], "refund_rule", RefundRule),
        categories=categories,
        funding=_funding(top.get("funding", {}), "funding", categories),
        supervision=_supervision(top.get("supervision", {}), "supervision"),
    )


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The policy as a plain, JSON-safe dict that :func:`policy_from_dict` accepts back.

    Deterministic: fixed key order, categories in policy order, grade keys as ascending digit
    strings (JSON object keys are strings), datetimes in ISO 8601, times as "HH:MM". ``funding``
    appears only when it is not the default, so a version published before funding rules
    keeps its exact canonical form.
    """
    window = policy.claim_window
    document: dict[str, Any] = {
        "version": policy.version,
        "effective_from": policy.effective_from.isoformat(),
        "campaign": {
            "name": policy.campaign.name,
            "area": policy.campaign.area,
            "regions": list(policy.campaign.regions),
        },
        "rounding": policy.rounding.value,
        "price_tolerance_bp": policy.price_tolerance_bp,
        "baseline_window_days": policy.baseline_window_days,
        "claim_window": {
            "opens": hhmm_text(window.opens),
            "closes": hhmm_text(window.closes),
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
    if policy.funding != FundingRules():
        document["funding"] = funding_to_dict(policy.funding)
    if policy.supervision != Supervision():  # absent: the defaults (older versions unchanged)
        document["supervision"] = supervision_to_dict(policy.supervision)
    return document


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


def policy_from_json(document: str) -> Policy:
    """The policy a :func:`policy_json` document holds (a read model's, an old event's),
    validated as any other document."""
    return policy_from_dict(json.loads(document))


@cache
def default_policy() -> Policy:
    """The policy shipped with the package: Shenzhen 2025 rules (cached; Policy is immutable)."""
    resource = resources.files("services.kernel.contract.policies").joinpath(
        DEFAULT_POLICY_RESOURCE
    )
    return policy_from_dict(_parse_yaml(resource.read_text(encoding="utf-8")))
