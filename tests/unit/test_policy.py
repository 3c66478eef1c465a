"""Subsidy policy: the shipped Shenzhen 2025 rules, the quote arithmetic, and strict loading."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from services.kernel.contract.policy import (
    BP_DENOMINATOR,
    GRADE_NOT_ELIGIBLE,
    INVALID_GRADE,
    INVALID_PRICE,
    MAX_PRICE_FEN,
    MIN_PRICE_FEN,
    NO_GRADE_NOT_ELIGIBLE,
    PRICE_ABOVE_CEILING,
    QUOTE_REASONS,
    UNKNOWN_CATEGORY,
    CategoryRule,
    Group,
    Policy,
    PolicyError,
    Quote,
    RefundRule,
    Rounding,
    apply_bp,
    default_policy,
    in_force,
    load_policy,
    named_version,
    policy_from_dict,
    policy_from_proto,
    policy_json,
    policy_of,
    policy_to_dict,
    policy_to_proto,
    quote,
)
from services.kernel.errors import FailedPrecondition, NotFound
from subsidy.v1 import events_pb2, policy_pb2

YUAN = 100  # fen per yuan

POLICY = default_policy()

NATIONAL = {
    "refrigerator": "电冰箱",
    "washing_machine": "洗衣机",
    "tv": "电视机",
    "air_conditioner": "空调",
    "computer": "电脑",
    "water_heater": "热水器",
    "stove": "家用灶具",
    "range_hood": "吸油烟机",
    "water_purifier": "净水器",
    "dishwasher": "洗碗机",
    "rice_cooker": "电饭煲",
    "microwave": "微波炉",
}
CITY = {
    "disinfection_cabinet": "消毒柜",
    "air_purifier": "空气净化器",
    "garment_care": "衣物护理机",
    "dryer": "干衣机",
    "robot_vacuum": "扫地机器人",
    "steam_oven": "蒸烤箱",
    "induction_cooker": "电磁炉",
    "air_fryer": "空气炸锅",
    "electric_cooker": "电压力锅",
    "kettle": "电水壶",
    "blender": "破壁机",
    "projector": "投影仪",
    "smart_display": "智能显示屏",
}
DIGITAL = {"phone": "手机", "tablet": "平板", "smartwatch": "智能手表手环"}


def _rule(code: str) -> CategoryRule:
    rule = POLICY.category(code)
    assert rule is not None, code
    return rule


def _policy_dict() -> dict[str, Any]:
    return copy.deepcopy(policy_to_dict(POLICY))


def _with_rounding(rounding: Rounding) -> Policy:
    data = _policy_dict()
    data["rounding"] = rounding.value
    return policy_from_dict(data)


HALF_UP_POLICY = _with_rounding(Rounding.HALF_UP)


# --------------------------------------------------------------------------------------------
# The examples under the default policy


@pytest.mark.parametrize(
    ("code", "grade", "price_fen", "subsidy_fen", "rate_bp"),
    [
        # 12,000 yuan * 20% = 2,400 yuan, capped at 2,000 yuan.
        ("refrigerator", 1, 12_000 * YUAN, 200_000, 2000),
        ("washing_machine", 2, 5_000 * YUAN, 75_000, 1500),
        ("phone", None, 3_000 * YUAN, 45_000, 1500),
        # 4,000 yuan * 15% = 600 yuan, capped at 500 yuan.
        ("tablet", None, 4_000 * YUAN, 50_000, 1500),
        ("air_fryer", None, 400 * YUAN, 6_000, 1500),
        # Exactly at the 6,000-yuan ceiling is still eligible.
        ("phone", None, 6_000 * YUAN, 50_000, 1500),
        ("air_fryer", 1, 400 * YUAN, 8_000, 2000),
        ("air_conditioner", 2, 3_999 * YUAN + 99, 59_999, 1500),
    ],
)
def test_eligible_quotes(
    code: str, grade: int | None, price_fen: int, subsidy_fen: int, rate_bp: int
) -> None:
    assert quote(POLICY, code, grade, price_fen) == Quote(
        eligible=True,
        subsidy_fen=subsidy_fen,
        rate_bp=rate_bp,
        cap_fen=_rule(code).cap_fen,
        policy_version="shenzhen-2025.1",
        reasons=(),
    )


def test_phone_above_the_price_ceiling_is_ineligible() -> None:
    q = quote(POLICY, "phone", None, 6_001 * YUAN)
    assert not q.eligible
    assert q.subsidy_fen == 0
    assert q.reasons == (PRICE_ABOVE_CEILING,)
    # The matching rule is still reported so checkout can explain the refusal.
    assert (q.rate_bp, q.cap_fen) == (1500, 50_000)


def test_one_fen_above_the_ceiling_is_ineligible() -> None:
    assert quote(POLICY, "smartwatch", None, 600_001).reasons == (PRICE_ABOVE_CEILING,)


@pytest.mark.parametrize("grade", [3, 4, 5])
def test_grade_3_to_5_tv_is_ineligible(grade: int) -> None:
    q = quote(POLICY, "tv", grade, 3_000 * YUAN)
    assert (q.eligible, q.subsidy_fen, q.rate_bp) == (False, 0, 0)
    assert q.reasons == (GRADE_NOT_ELIGIBLE,)


@pytest.mark.parametrize("code", sorted(NATIONAL))
def test_national_appliance_without_grade_is_ineligible(code: str) -> None:
    q = quote(POLICY, code, None, 3_000 * YUAN)
    assert (q.eligible, q.subsidy_fen) == (False, 0)
    assert q.reasons == (NO_GRADE_NOT_ELIGIBLE,)


@pytest.mark.parametrize("code", sorted(CITY))
@pytest.mark.parametrize(("grade", "rate_bp"), [(1, 2000), (2, 1500), (None, 1500)])
def test_city_appliance_rates(code: str, grade: int | None, rate_bp: int) -> None:
    q = quote(POLICY, code, grade, 1_000 * YUAN)
    assert q.eligible
    assert q.subsidy_fen == 1_000 * YUAN * rate_bp // BP_DENOMINATOR


@pytest.mark.parametrize("code", sorted(DIGITAL))
@pytest.mark.parametrize("grade", [1, 2, 3, 4, 5])
def test_digital_product_with_a_grade_is_not_eligible(code: str, grade: int) -> None:
    # Digital categories have no efficiency grades; a graded "phone" is a registration error.
    assert quote(POLICY, code, grade, 1_000 * YUAN).reasons == (GRADE_NOT_ELIGIBLE,)


# --------------------------------------------------------------------------------------------
# The shipped policy's contents


def test_default_policy_has_28_categories_with_the_documented_names() -> None:
    assert len(POLICY.categories) == 28
    groups: dict[Group, dict[str, str]] = {
        Group.NATIONAL_APPLIANCE: NATIONAL,
        Group.CITY_APPLIANCE: CITY,
        Group.DIGITAL: DIGITAL,
    }
    for group, names in groups.items():
        in_group = {r.code: r.name_zh for r in POLICY.categories if r.group is group}
        assert in_group == names
    assert len(NATIONAL) == 12
    assert len(CITY) == 13
    assert len(DIGITAL) == 3
    assert POLICY.category_codes == (*NATIONAL, *CITY, *DIGITAL)
    assert all(rule.name_en for rule in POLICY.categories)


@pytest.mark.parametrize("code", sorted(NATIONAL))
def test_national_rules(code: str) -> None:
    rule = _rule(code)
    assert rule.grade_rates == {1: 2000, 2: 1500}
    assert rule.no_grade_rate_bp is None
    assert rule.cap_fen == 2_000 * YUAN
    assert rule.price_ceiling_fen is None
    assert rule.per_person_limit == (3 if code == "air_conditioner" else 1)
    assert rule.daily_quota == 5000


@pytest.mark.parametrize("code", sorted(CITY))
def test_city_rules(code: str) -> None:
    rule = _rule(code)
    assert rule.grade_rates == {1: 2000, 2: 1500}
    assert rule.no_grade_rate_bp == 1500
    assert rule.cap_fen == 2_000 * YUAN
    assert rule.price_ceiling_fen is None
    assert rule.per_person_limit == 1


@pytest.mark.parametrize("code", sorted(DIGITAL))
def test_digital_rules(code: str) -> None:
    rule = _rule(code)
    assert rule.grade_rates == {}
    assert rule.no_grade_rate_bp == 1500
    assert rule.cap_fen == 500 * YUAN
    assert rule.price_ceiling_fen == 6_000 * YUAN
    assert rule.per_person_limit == 1


def test_default_policy_settings() -> None:
    assert POLICY.version == "shenzhen-2025.1"
    assert POLICY.effective_from == dt.datetime(
        2025, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))
    )
    assert POLICY.effective_from.utcoffset() == dt.timedelta(hours=8)
    assert POLICY.campaign.area == "440310"
    assert POLICY.rounding is Rounding.DOWN
    assert POLICY.price_tolerance_bp == 1000
    assert POLICY.baseline_window_days == 90
    assert POLICY.claim_window.opens == dt.time(10, 0)
    assert POLICY.claim_window.closes == dt.time(23, 0)
    assert POLICY.claim_window.timezone == "Asia/Shanghai"
    assert POLICY.qualification_validity_days >= 1
    assert POLICY.reclaim_limit == 2
    assert POLICY.refund_rule in set(RefundRule)


def test_default_policy_is_cached_and_immutable() -> None:
    assert default_policy() is default_policy()
    with pytest.raises(AttributeError):
        POLICY.version = "tampered"  # type: ignore[misc]
    assert hash(POLICY) == hash(policy_from_dict(policy_to_dict(POLICY)))


def test_rate_lookup_helpers() -> None:
    tv = _rule("tv")
    assert [tv.rate_bp_for(g) for g in (None, 1, 2, 3, 4, 5)] == [
        None,
        2000,
        1500,
        None,
        None,
        None,
    ]
    assert tv.grade_rates is not tv.grade_rates  # a fresh dict: callers cannot mutate the rule
    assert POLICY.category("no_such_thing") is None


# --------------------------------------------------------------------------------------------
# Invalid inputs to quote


@pytest.mark.parametrize("price_fen", [0, -1, -(10**12), MAX_PRICE_FEN + 1, 10**30])
def test_out_of_range_price_is_invalid(price_fen: int) -> None:
    q = quote(POLICY, "tv", 1, price_fen)
    assert (q.eligible, q.subsidy_fen, q.reasons) == (False, 0, (INVALID_PRICE,))


@pytest.mark.parametrize("price_fen", [True, 1999.0, "1999", None])
def test_non_integer_price_is_invalid(price_fen: object) -> None:
    q = quote(POLICY, "tv", 1, price_fen)  # type: ignore[arg-type]
    assert q.reasons == (INVALID_PRICE,)


def test_price_bounds_are_inclusive() -> None:
    assert quote(POLICY, "tv", 1, MIN_PRICE_FEN) == quote(POLICY, "tv", 1, 1)
    assert quote(POLICY, "tv", 1, 1).eligible
    assert quote(POLICY, "tv", 1, 1).subsidy_fen == 0  # 0.2 fen rounds down to nothing
    assert quote(POLICY, "tv", 1, MAX_PRICE_FEN).subsidy_fen == 200_000


@pytest.mark.parametrize("grade", [0, 6, -1, 100, True, False, 1.0, "1"])
def test_invalid_grade(grade: object) -> None:
    q = quote(POLICY, "tv", grade, 100_000)  # type: ignore[arg-type]
    assert (q.eligible, q.subsidy_fen, q.reasons) == (False, 0, (INVALID_GRADE,))


@pytest.mark.parametrize("code", ["", "TV", "television", "smart_glasses", " tv", None, 3])
def test_unknown_category(code: object) -> None:
    q = quote(POLICY, code, 1, 100_000)  # type: ignore[arg-type]
    assert q == Quote(False, 0, 0, 0, POLICY.version, (UNKNOWN_CATEGORY,))


def test_all_applicable_reasons_are_listed_in_a_fixed_order() -> None:
    assert quote(POLICY, "nope", 9, 0).reasons == (INVALID_PRICE, INVALID_GRADE, UNKNOWN_CATEGORY)
    assert quote(POLICY, "phone", 1, 700_000).reasons == (GRADE_NOT_ELIGIBLE, PRICE_ABOVE_CEILING)
    assert quote(POLICY, "tablet", 7, 700_000).reasons == (INVALID_GRADE, PRICE_ABOVE_CEILING)
    assert quote(POLICY, "tv", None, -5).reasons == (INVALID_PRICE, NO_GRADE_NOT_ELIGIBLE)


# --------------------------------------------------------------------------------------------
# Rounding


@pytest.mark.parametrize(
    ("amount", "bp", "down", "half_up"),
    [
        (0, 1500, 0, 0),
        (1, 1500, 0, 0),  # 0.15
        (3, 1500, 0, 0),  # 0.45
        (4, 1500, 0, 1),  # 0.6
        (10, 1500, 1, 2),  # 1.5: a half rounds up
        (30, 1500, 4, 5),  # 4.5
        (29, 1500, 4, 4),  # 4.35
        (1, 5000, 0, 1),  # 0.5
        (1, 4999, 0, 0),
        (12_345, 0, 0, 0),
        (12_345, 10_000, 12_345, 12_345),
        (MAX_PRICE_FEN, 1, 10**6, 10**6),
    ],
)
def test_apply_bp(amount: int, bp: int, down: int, half_up: int) -> None:
    assert apply_bp(amount, bp, Rounding.DOWN) == down
    assert apply_bp(amount, bp, Rounding.HALF_UP) == half_up


@pytest.mark.parametrize(("amount", "bp"), [(-1, 1500), (100, -1)])
def test_apply_bp_rejects_negative_inputs(amount: int, bp: int) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        apply_bp(amount, bp, Rounding.DOWN)


def test_half_up_policy_rounds_once_per_item() -> None:
    # 99.99 yuan * 15% = 14.9985 yuan = 1499.85 fen.
    assert quote(POLICY, "kettle", None, 9_999).subsidy_fen == 1499
    assert quote(HALF_UP_POLICY, "kettle", None, 9_999).subsidy_fen == 1500
    assert quote(HALF_UP_POLICY, "kettle", None, 10).subsidy_fen == 2  # 1.5 fen


def test_rounding_defaults_to_down_when_omitted() -> None:
    data = _policy_dict()
    del data["rounding"]
    assert policy_from_dict(data).rounding is Rounding.DOWN


# --------------------------------------------------------------------------------------------
# Properties over every category, grade and price

categories = st.sampled_from(POLICY.categories)
grades = st.one_of(st.none(), st.integers(min_value=1, max_value=5))
# Mix the full range with realistic prices so both caps and small amounts get exercised.
prices = st.one_of(
    st.integers(min_value=MIN_PRICE_FEN, max_value=MAX_PRICE_FEN),
    st.integers(min_value=MIN_PRICE_FEN, max_value=2_000_000),
)


def _reference_subsidy(
    rule: CategoryRule, grade: int | None, price: int, rounding: Rounding
) -> int:
    """Independent model of the rules using exact fractions."""
    rate = rule.rate_bp_for(grade)
    if rate is None or (rule.price_ceiling_fen is not None and price > rule.price_ceiling_fen):
        return 0
    exact = Fraction(price * rate, BP_DENOMINATOR)
    rounded = math.floor(exact) if rounding is Rounding.DOWN else math.floor(exact + Fraction(1, 2))
    return min(rule.cap_fen, rounded)


@given(rule=categories, grade=grades, price=prices)
def test_quote_invariants(rule: CategoryRule, grade: int | None, price: int) -> None:
    q = quote(POLICY, rule.code, grade, price)
    assert type(q.subsidy_fen) is int
    assert type(q.rate_bp) is int
    assert type(q.cap_fen) is int
    assert 0 <= q.subsidy_fen <= q.cap_fen == rule.cap_fen
    assert q.subsidy_fen * BP_DENOMINATOR <= q.rate_bp * price
    assert q.eligible == (q.reasons == ())
    assert set(q.reasons) <= QUOTE_REASONS
    assert q.policy_version == POLICY.version
    if not q.eligible:
        assert q.subsidy_fen == 0
    assert q.subsidy_fen == _reference_subsidy(rule, grade, price, Rounding.DOWN)


@given(rule=categories, grade=grades, price=prices)
def test_eligibility_matches_the_rule(rule: CategoryRule, grade: int | None, price: int) -> None:
    q = quote(POLICY, rule.code, grade, price)
    graded_ok = rule.rate_bp_for(grade) is not None
    price_ok = rule.price_ceiling_fen is None or price <= rule.price_ceiling_fen
    assert q.eligible == (graded_ok and price_ok)


@given(rule=categories, grade=grades, a=prices, b=prices)
def test_subsidy_is_monotone_in_price_up_to_the_ceiling(
    rule: CategoryRule, grade: int | None, a: int, b: int
) -> None:
    low, high = sorted((a, b))
    assume(rule.price_ceiling_fen is None or high <= rule.price_ceiling_fen)
    for policy in (POLICY, HALF_UP_POLICY):
        assert (
            quote(policy, rule.code, grade, low).subsidy_fen
            <= quote(policy, rule.code, grade, high).subsidy_fen
        )


@given(rule=categories, grade=grades, price=prices)
def test_half_up_is_within_half_a_fen(rule: CategoryRule, grade: int | None, price: int) -> None:
    q = quote(HALF_UP_POLICY, rule.code, grade, price)
    assert type(q.subsidy_fen) is int
    assert 0 <= q.subsidy_fen <= rule.cap_fen
    assert q.subsidy_fen == _reference_subsidy(rule, grade, price, Rounding.HALF_UP)
    if q.eligible and q.subsidy_fen < rule.cap_fen:
        assert abs(2 * (q.subsidy_fen * BP_DENOMINATOR - q.rate_bp * price)) <= BP_DENOMINATOR


@given(
    rule=categories,
    grade=st.one_of(grades, st.integers(), st.booleans()),
    price=st.one_of(st.integers(), st.booleans()),
)
def test_invalid_inputs_are_never_eligible(
    rule: CategoryRule, grade: int | None, price: int
) -> None:
    # st.booleans() draws bool, an int subclass: True must not pass as 1 fen or grade 1.
    q = quote(POLICY, rule.code, grade, price)
    bad_price = isinstance(price, bool) or not MIN_PRICE_FEN <= price <= MAX_PRICE_FEN
    bad_grade = grade is not None and (isinstance(grade, bool) or not 1 <= grade <= 5)
    assert (INVALID_PRICE in q.reasons) == bad_price
    assert (INVALID_GRADE in q.reasons) == bad_grade
    if bad_price or bad_grade:
        assert (q.eligible, q.subsidy_fen) == (False, 0)


# --------------------------------------------------------------------------------------------
# Serialisation


def test_dict_round_trip() -> None:
    assert policy_from_dict(policy_to_dict(POLICY)) == POLICY


def test_dict_is_json_safe_and_deterministic() -> None:
    data = policy_to_dict(POLICY)
    text = json.dumps(data, ensure_ascii=False)
    assert json.loads(text) == data
    assert json.dumps(policy_to_dict(POLICY), ensure_ascii=False) == text
    assert policy_from_dict(json.loads(text)) == POLICY
    assert data["categories"][0]["grades"] == {"1": 2000, "2": 1500}
    assert data["effective_from"] == "2025-01-01T00:00:00+08:00"
    assert data["claim_window"] == {
        "opens": "10:00",
        "closes": "23:00",
        "timezone": "Asia/Shanghai",
    }


def test_yaml_dump_of_the_dict_loads_back() -> None:
    text = yaml.safe_dump(policy_to_dict(POLICY), allow_unicode=True, sort_keys=False)
    assert load_policy(text) == POLICY


def test_load_policy_from_a_path_and_a_path_string(tmp_path: Path) -> None:
    shipped = Path(__file__).parents[2] / "services/kernel/contract/policies/shenzhen-2025.yaml"
    target = tmp_path / "copy.yaml"
    target.write_text(shipped.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_policy(target) == POLICY
    assert load_policy(str(target)) == POLICY


def test_load_policy_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "absent.yaml")
    with pytest.raises(FileNotFoundError):
        load_policy(str(tmp_path / "absent.yml"))


def test_grade_keys_may_be_integers_or_digit_strings() -> None:
    data = _policy_dict()
    data["categories"][0]["grades"] = {2: 1500, "1": 2000}
    rule = policy_from_dict(data).categories[0]
    assert rule.grades == ((1, 2000), (2, 1500))


def test_aware_datetime_objects_are_accepted() -> None:
    data = _policy_dict()
    data["effective_from"] = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    assert policy_from_dict(data).effective_from == dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


# Valid policy documents built from scratch, to check the round trip beyond the shipped file.
_codes = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
_bps = st.integers(min_value=0, max_value=BP_DENOMINATOR)
_category_dicts = st.fixed_dictionaries(
    {
        "name_zh": st.sampled_from(["电冰箱", "手机", "投影仪"]),
        "name_en": st.sampled_from(["Fridge", "Phone", "Projector"]),
        "group": st.sampled_from([g.value for g in Group]),
        "grades": st.dictionaries(st.integers(min_value=1, max_value=5), _bps, max_size=5),
        "no_grade_rate_bp": st.one_of(st.none(), _bps),
        "cap_fen": st.integers(min_value=0, max_value=10**9),
        "price_ceiling_fen": st.one_of(st.none(), st.integers(min_value=1, max_value=10**10)),
        "per_person_limit": st.integers(min_value=1, max_value=10),
        "daily_quota": st.integers(min_value=0, max_value=10**6),
    }
)


@st.composite
def _policy_dicts(draw: st.DrawFn) -> dict[str, Any]:
    codes = draw(st.lists(_codes, min_size=1, max_size=6, unique=True))
    opens = draw(st.integers(min_value=0, max_value=23 * 60 + 58))
    closes = draw(st.integers(min_value=opens + 1, max_value=24 * 60))  # 24:00: end of day
    offset = draw(st.integers(min_value=-12, max_value=14))
    moment = draw(
        st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1))
    )
    return {
        "version": draw(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)),
        "effective_from": moment.replace(
            tzinfo=dt.timezone(dt.timedelta(hours=offset))
        ).isoformat(),
        "campaign": {
            "name": "测试活动",
            "area": draw(st.from_regex(r"[1-9][0-9]{5}", fullmatch=True)),
            "regions": draw(
                st.lists(
                    st.from_regex(r"[1-9][0-9]{5}([0-9]{3}([0-9]{3})?)?", fullmatch=True),
                    min_size=1,
                    max_size=4,
                    unique=True,
                )
            ),
        },
        "rounding": draw(st.sampled_from([r.value for r in Rounding])),
        "price_tolerance_bp": draw(_bps),
        "baseline_window_days": draw(st.integers(min_value=1, max_value=400)),
        "claim_window": {
            "opens": f"{opens // 60:02d}:{opens % 60:02d}",
            "closes": f"{closes // 60:02d}:{closes % 60:02d}",
            "timezone": draw(st.sampled_from(["Asia/Shanghai", "UTC", "Asia/Hong_Kong"])),
        },
        "qualification_validity_days": draw(st.integers(min_value=1, max_value=31)),
        "reclaim_limit": draw(st.integers(min_value=0, max_value=5)),
        "refund_rule": draw(st.sampled_from([r.value for r in RefundRule])),
        "categories": [{"code": code, **draw(_category_dicts)} for code in codes],
    }


@given(_policy_dicts())
def test_generated_policies_round_trip(data: dict[str, Any]) -> None:
    policy = policy_from_dict(data)
    emitted = policy_to_dict(policy)
    assert policy_from_dict(emitted) == policy
    assert policy_to_dict(policy_from_dict(json.loads(json.dumps(emitted)))) == emitted


@given(_policy_dicts())
def test_generated_policies_survive_the_proto_message_exactly(data: dict[str, Any]) -> None:
    policy = policy_from_dict(data)
    wire = policy_to_proto(policy).SerializeToString(deterministic=True)
    back = policy_from_proto(policy_pb2.Policy.FromString(wire))
    assert back == policy
    assert policy_to_dict(back) == policy_to_dict(policy)  # the UTC offset as written, too


def test_regions_default_to_the_area_and_a_policy_from_before_regions_reads_the_same() -> None:
    data = _policy_dict()
    del data["campaign"]["regions"]
    policy = policy_from_dict(data)
    assert policy.campaign.regions == (policy.campaign.area,)
    old_message = policy_to_proto(policy)
    del old_message.campaign.regions[:]  # as published before regions existed
    assert policy_from_proto(old_message) == policy


def test_a_window_to_24_00_reads_back_as_24_00() -> None:
    data = _policy_dict()
    data["claim_window"]["closes"] = "24:00"
    policy = policy_from_dict(data)
    assert policy.claim_window.is_open(dt.datetime(2025, 6, 1, 15, 59, 59, tzinfo=dt.UTC))
    assert policy_to_dict(policy)["claim_window"]["closes"] == "24:00"
    assert policy_to_proto(policy).claim_window.closes == "24:00"


def test_the_default_policy_as_its_proto_message() -> None:
    message = policy_to_proto(POLICY)
    assert (message.version, message.effective_from_utc_offset_seconds) == (
        "shenzhen-2025.1",
        8 * 3600,
    )
    assert message.effective_from.ToDatetime(tzinfo=dt.UTC) == dt.datetime(
        2024, 12, 31, 16, 0, tzinfo=dt.UTC
    )
    fridge = message.categories[0]
    assert (fridge.code, [(g.grade, g.rate_bp) for g in fridge.grades], fridge.cap_fen) == (
        "refrigerator",
        [(1, 2000), (2, 1500)],
        200_000,
    )
    # "no rate" and "no ceiling" are absent fields, not zeros.
    assert not fridge.HasField("no_grade_rate_bp") and not fridge.HasField("price_ceiling_fen")
    phone = next(c for c in message.categories if c.code == "phone")
    assert (phone.no_grade_rate_bp, phone.price_ceiling_fen) == (1500, 600_000)


def _broken(edit: Callable[[policy_pb2.Policy], None]) -> policy_pb2.Policy:
    message = policy_to_proto(POLICY)
    edit(message)
    return message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.ClearField("effective_from"), "effective_from: is required"),
        (lambda m: setattr(m, "rounding", 0), "rounding: unknown value ''"),
        (lambda m: setattr(m, "refund_rule", 7), "refund_rule: unknown value ''"),
        (lambda m: setattr(m.categories[3], "group", 0), "categories[3].group: unknown value"),
        (lambda m: setattr(m.categories[3], "cap_fen", -1), "categories[3].cap_fen: must be"),
        (
            lambda m: m.categories[0].grades.add(grade=1, rate_bp=10),
            "categories[0].grades[1]: duplicate grade",
        ),
        (
            lambda m: setattr(m.categories[0].grades[0], "rate_bp", 10_001),
            "categories[0].grades[1]: must be an integer in 0..10000",
        ),
        (lambda m: setattr(m.claim_window, "opens", "10"), "claim_window.opens: must be"),
        (lambda m: setattr(m.claim_window, "timezone", "Mars/Base"), "claim_window.timezone"),
        (lambda m: setattr(m.campaign, "area", "000000"), "campaign.area: must match"),
        (
            lambda m: setattr(m, "effective_from_utc_offset_seconds", 86_400),
            "effective_from_utc_offset_seconds: must be strictly between",
        ),
        (lambda m: m.ClearField("categories"), "categories: must be a non-empty list"),
    ],
)
def test_a_proto_policy_is_validated_like_a_document(
    edit: Callable[[policy_pb2.Policy], None], expected: str
) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_proto(_broken(edit))
    assert str(err.value).startswith(expected), str(err.value)


def test_events_carry_the_message_and_old_events_stay_readable() -> None:
    new = events_pb2.PolicyPublished(version=POLICY.version, policy=policy_to_proto(POLICY))
    old = events_pb2.PolicyPublished(version=POLICY.version, policy_json=policy_json(POLICY))
    drafted = events_pb2.PolicyDrafted(version=POLICY.version, policy=policy_to_proto(POLICY))
    assert policy_of(new) == policy_of(old) == policy_of(drafted) == POLICY
    # The message is the smaller form on the wire.
    assert new.ByteSize() < old.ByteSize()


# --------------------------------------------------------------------------------------------
# The version in force

V1 = dataclasses.replace(
    POLICY, version="v1", effective_from=dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
)
V2 = dataclasses.replace(
    POLICY, version="v2", effective_from=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
)


def test_the_version_in_force_is_the_latest_that_has_started() -> None:
    versions = [V2, V1]
    assert in_force(versions, dt.datetime(2025, 6, 1, tzinfo=dt.UTC)) == V1
    assert in_force(versions, V2.effective_from) == V2  # from its first instant
    assert in_force(versions, V2.effective_from - dt.timedelta(microseconds=1)) == V1
    # The same instant in another offset is the same instant.
    shanghai = dt.timezone(dt.timedelta(hours=8))
    assert in_force(versions, dt.datetime(2026, 1, 1, 8, tzinfo=shanghai)) == V2


def test_versions_starting_together_are_ordered_by_name_whatever_the_order_given() -> None:
    twin = dataclasses.replace(V2, version="v2b")
    at = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert in_force([V2, twin, V1], at) == in_force([twin, V1, V2], at) == twin


def test_before_any_version_nothing_is_in_force() -> None:
    with pytest.raises(FailedPrecondition) as err:
        in_force([V1, V2], dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    assert err.value.reason == "NO_POLICY_IN_FORCE"
    with pytest.raises(FailedPrecondition):
        in_force([], dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


def test_an_unknown_version_is_an_error_never_another_version() -> None:
    versions = {"v1": V1, "v2": V2}
    assert named_version(versions, "v1") == V1
    with pytest.raises(NotFound) as err:
        named_version(versions, "v3")
    assert (err.value.reason, err.value.field) == ("UNKNOWN_POLICY_VERSION", "policy_version")


# --------------------------------------------------------------------------------------------
# Rejections: each names the offending field path

Mutation = Callable[[dict[str, Any]], None]


def _set(*path: str | int, value: object) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(*path: str | int) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


REJECTIONS: list[tuple[str, Mutation, str]] = [
    # unknown keys
    ("unknown top-level key", _set("budget_fen", value=1), "budget_fen: unknown key"),
    (
        "unknown category key",
        _set("categories", 3, "colour", value="red"),
        "categories[3].colour: unknown key",
    ),
    (
        "unknown window key",
        _set("claim_window", "lunch", value="12:00"),
        "claim_window.lunch: unknown key",
    ),
    ("unknown campaign key", _set("campaign", "owner", value="x"), "campaign.owner: unknown key"),
    # missing keys
    ("missing version", _delete("version"), "version: is required"),
    ("missing cap", _delete("categories", 0, "cap_fen"), "categories[0].cap_fen: is required"),
    (
        "missing ceiling",
        _delete("categories", 26, "price_ceiling_fen"),
        "categories[26].price_ceiling_fen: is required",
    ),
    ("missing timezone", _delete("claim_window", "timezone"), "claim_window.timezone: is required"),
    # wrong types
    (
        "cap as string",
        _set("categories", 3, "cap_fen", value="200000"),
        "categories[3].cap_fen: must be a non-negative integer",
    ),
    (
        "cap as float",
        _set("categories", 3, "cap_fen", value=200000.0),
        "categories[3].cap_fen: must be a non-negative integer",
    ),
    (
        "cap as bool",
        _set("categories", 3, "cap_fen", value=True),
        "categories[3].cap_fen: must be a non-negative integer",
    ),
    (
        "cap as null",
        _set("categories", 3, "cap_fen", value=None),
        "categories[3].cap_fen: must be a non-negative integer",
    ),
    (
        "quota as float",
        _set("categories", 1, "daily_quota", value=5e3),
        "categories[1].daily_quota: must be a non-negative integer",
    ),
    (
        "tolerance as text",
        _set("price_tolerance_bp", value="10%"),
        "price_tolerance_bp: must be an integer in 0..10000",
    ),
    (
        "grades as list",
        _set("categories", 0, "grades", value=[2000, 1500]),
        "categories[0].grades: must be a mapping",
    ),
    (
        "categories as mapping",
        _set("categories", value={"tv": {}}),
        "categories: must be a non-empty list",
    ),
    ("categories empty", _set("categories", value=[]), "categories: must be a non-empty list"),
    ("category as string", _set("categories", 2, value="tv"), "categories[2]: must be a mapping"),
    ("campaign as string", _set("campaign", value="Pingshan"), "campaign: must be a mapping"),
    (
        "window as string",
        _set("claim_window", value="10:00-23:00"),
        "claim_window: must be a mapping",
    ),
    (
        "code as int",
        _set("categories", 0, "code", value=7),
        "categories[0].code: must be a non-empty string",
    ),
    (
        "name_zh empty",
        _set("categories", 0, "name_zh", value=""),
        "categories[0].name_zh: must be a non-empty string",
    ),
    (
        "name_en padded",
        _set("categories", 0, "name_en", value=" Fridge"),
        "categories[0].name_en: must not have leading",
    ),
    (
        "name too long",
        _set("campaign", "name", value="x" * 201),
        "campaign.name: must be a non-empty string",
    ),
    ("code uppercase", _set("categories", 0, "code", value="TV"), "categories[0].code: must match"),
    ("version with space", _set("version", value="shenzhen 2025"), "version: must match"),
    ("area not a code", _set("campaign", "area", value="Pingshan"), "campaign.area: must match"),
    (
        "area as int",
        _set("campaign", "area", value=440310),
        "campaign.area: must be a non-empty string",
    ),
    # negative or zero where positive is required
    (
        "negative cap",
        _set("categories", 3, "cap_fen", value=-1),
        "categories[3].cap_fen: must be a non-negative integer",
    ),
    (
        "negative quota",
        _set("categories", 4, "daily_quota", value=-5),
        "categories[4].daily_quota: must be a non-negative integer",
    ),
    (
        "negative reclaim",
        _set("reclaim_limit", value=-1),
        "reclaim_limit: must be a non-negative integer",
    ),
    (
        "zero baseline window",
        _set("baseline_window_days", value=0),
        "baseline_window_days: must be a positive integer",
    ),
    (
        "negative validity",
        _set("qualification_validity_days", value=-3),
        "qualification_validity_days: must be a positive integer",
    ),
    (
        "zero per-person limit",
        _set("categories", 3, "per_person_limit", value=0),
        "categories[3].per_person_limit: must be a positive integer",
    ),
    (
        "zero ceiling",
        _set("categories", 25, "price_ceiling_fen", value=0),
        "categories[25].price_ceiling_fen: must be a positive integer",
    ),
    (
        "negative ceiling",
        _set("categories", 25, "price_ceiling_fen", value=-600000),
        "categories[25].price_ceiling_fen: must be a positive integer",
    ),
    # basis points outside 0..10000
    (
        "grade rate too high",
        _set("categories", 0, "grades", value={1: 10_001}),
        "categories[0].grades[1]: must be an integer in 0..10000",
    ),
    (
        "grade rate negative",
        _set("categories", 0, "grades", value={"2": -1}),
        "categories[0].grades[2]: must be an integer in 0..10000",
    ),
    (
        "grade rate float",
        _set("categories", 0, "grades", value={1: 0.2}),
        "categories[0].grades[1]: must be an integer in 0..10000",
    ),
    (
        "no-grade rate negative",
        _set("categories", 12, "no_grade_rate_bp", value=-1),
        "categories[12].no_grade_rate_bp: must be an integer in 0..10000",
    ),
    (
        "no-grade rate too high",
        _set("categories", 12, "no_grade_rate_bp", value=15_000),
        "categories[12].no_grade_rate_bp: must be an integer in 0..10000",
    ),
    (
        "tolerance too high",
        _set("price_tolerance_bp", value=10_001),
        "price_tolerance_bp: must be an integer in 0..10000",
    ),
    (
        "tolerance negative",
        _set("price_tolerance_bp", value=-1),
        "price_tolerance_bp: must be an integer in 0..10000",
    ),
    # grade keys
    (
        "grade 0",
        _set("categories", 0, "grades", value={0: 100}),
        "categories[0].grades[0]: grade must be an integer 1..5",
    ),
    (
        "grade 6",
        _set("categories", 0, "grades", value={6: 100}),
        "categories[0].grades[6]: grade must be an integer 1..5",
    ),
    (
        "grade text",
        _set("categories", 0, "grades", value={"one": 100}),
        "categories[0].grades['one']: grade must be",
    ),
    (
        "grade bool",
        _set("categories", 0, "grades", value={True: 100}),
        "categories[0].grades[True]: grade must be",
    ),
    (
        "grade duplicated",
        _set("categories", 0, "grades", value={1: 2000, "1": 2000}),
        "categories[0].grades[1]: duplicate grade",
    ),
    # duplicates and enums
    (
        "duplicate code",
        _set("categories", 5, "code", value="tv"),
        "categories[5].code: duplicate category code 'tv' (first at index 2)",
    ),
    (
        "unknown group",
        _set("categories", 3, "group", value="imported"),
        "categories[3].group: unknown value 'imported'",
    ),
    (
        "group as int",
        _set("categories", 3, "group", value=1),
        "categories[3].group: must be one of",
    ),
    ("unknown rounding", _set("rounding", value="up"), "rounding: unknown value 'up'"),
    ("unknown refund rule", _set("refund_rule", value="keep"), "refund_rule: unknown value 'keep'"),
    # dates and times
    (
        "naive effective_from",
        _set("effective_from", value="2025-01-01T00:00:00"),
        "effective_from: must be an ISO 8601 datetime with a UTC offset",
    ),
    (
        "date-only effective_from",
        _set("effective_from", value="2025-01-01"),
        "effective_from: must be an ISO 8601 datetime",
    ),
    (
        "garbage effective_from",
        _set("effective_from", value="next monday"),
        "effective_from: must be an ISO 8601 datetime",
    ),
    (
        "numeric effective_from",
        _set("effective_from", value=20250101),
        "effective_from: must be an ISO 8601 datetime",
    ),
    (
        "naive datetime object",
        _set("effective_from", value=dt.datetime(2025, 1, 1)),
        "effective_from: must be an ISO 8601",
    ),
    (
        "time as base-60 number",
        _set("claim_window", "opens", value=600),
        'claim_window.opens: must be a "HH:MM" string (quote it',
    ),
    (
        "time out of range",
        _set("claim_window", "closes", value="24:30"),
        'claim_window.closes: must be a "HH:MM" string',
    ),
    (
        "a window cannot open at the end of the day",
        _set("claim_window", "opens", value="24:00"),
        'claim_window.opens: must be a "HH:MM" string',
    ),
    (
        "region code malformed",
        _set("campaign", "regions", value=["44031"]),
        "campaign.regions[0]: ",
    ),
    (
        "regions empty",
        _set("campaign", "regions", value=[]),
        "campaign.regions: must be a list of 1..",
    ),
    (
        "region listed twice",
        _set("campaign", "regions", value=["440310", "440310"]),
        "campaign.regions[1]: duplicate region",
    ),
    (
        "time with seconds",
        _set("claim_window", "opens", value="10:00:00"),
        'claim_window.opens: must be a "HH:MM" string',
    ),
    (
        "window closes before opens",
        _set("claim_window", "closes", value="09:59"),
        "claim_window.closes: must be later than opens",
    ),
    (
        "window empty",
        _set("claim_window", "closes", value="10:00"),
        "claim_window.closes: must be later than opens",
    ),
    (
        "unknown time zone",
        _set("claim_window", "timezone", value="Mars/Olympus_Mons"),
        "claim_window.timezone: unknown IANA time zone",
    ),
    (
        "path-like time zone",
        _set("claim_window", "timezone", value="../../etc/passwd"),
        "claim_window.timezone: unknown IANA time zone",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in REJECTIONS], ids=[i for i, _, _ in REJECTIONS]
)
def test_policy_rejections_name_the_field(mutate: Mutation, expected: str) -> None:
    data = _policy_dict()
    mutate(data)
    with pytest.raises(PolicyError) as caught:
        policy_from_dict(data)
    assert expected in str(caught.value)
    assert str(caught.value).startswith(caught.value.path)


@pytest.mark.parametrize("document", [None, [], "policy", 3, [{"version": "x"}]])
def test_top_level_must_be_a_mapping(document: object) -> None:
    with pytest.raises(PolicyError, match="must be a mapping"):
        policy_from_dict(document)


def test_top_level_keys_must_be_strings() -> None:
    data: dict[Any, Any] = _policy_dict()
    data[1] = "one"
    with pytest.raises(PolicyError, match="keys must be strings"):
        policy_from_dict(data)


SHIPPED_TEXT = (
    Path(__file__).parents[2] / "services/kernel/contract/policies/shenzhen-2025.yaml"
).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # PyYAML would silently keep the last of two equal keys; a policy must not.
        (
            lambda t: t.replace(
                "    cap_fen: 200000\n", "    cap_fen: 200000\n    cap_fen: 9\n", 1
            ),
            "duplicate key 'cap_fen'",
        ),
        (
            lambda t: t.replace("reclaim_limit: 2\n", "reclaim_limit: 2\nreclaim_limit: 5\n"),
            "duplicate key 'reclaim_limit'",
        ),
        (
            lambda t: t.replace('opens: "10:00"', "opens: 10:00"),
            'claim_window.opens: must be a "HH:MM" string (quote it',
        ),
        (lambda t: t.replace("categories:\n", "categories: [\n", 1), "invalid YAML"),
        (lambda t: t.replace("version: shenzhen-2025.1", "version: [shenzhen"), "invalid YAML"),
        (lambda t: t + "\n? [a, b]\n: 1\n", "mapping keys must be scalars"),
        (
            lambda t: t.replace("group: digital", "group: !!binary aGk=", 1),
            "categories[25].group: must be one of",
        ),
        (lambda t: "", "must be a mapping"),
        (lambda t: "- just\n- a list\n", "must be a mapping"),
    ],
)
def test_yaml_level_rejections(edit: Callable[[str], str], expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(edit(SHIPPED_TEXT))
    assert expected in str(caught.value)


def test_duplicate_yaml_key_error_names_the_line() -> None:
    text = SHIPPED_TEXT.replace("reclaim_limit: 2\n", "reclaim_limit: 2\nreclaim_limit: 5\n")
    line = text.splitlines().index("reclaim_limit: 5") + 1
    with pytest.raises(PolicyError, match=f"^line {line}: duplicate key"):
        load_policy(text)


def test_unquoted_yaml_timestamp_stays_a_string_and_validates() -> None:
    text = SHIPPED_TEXT.replace(
        'effective_from: "2025-01-01T00:00:00+08:00"', "effective_from: 2025-01-01T00:00:00+08:00"
    )
    assert text != SHIPPED_TEXT
    assert load_policy(text) == POLICY
    naive = SHIPPED_TEXT.replace(
        'effective_from: "2025-01-01T00:00:00+08:00"', "effective_from: 2025-01-01"
    )
    with pytest.raises(PolicyError, match=r"^effective_from: must be an ISO 8601 datetime"):
        load_policy(naive)
