"""Inputs that reach money or reports are canonical and safe: one unit has one serial, and a
policy's amounts are bounded so that no quote leaves int64."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel import validate
from services.kernel.contract.limits import (
    INT64_MAX,
    MAX_CAP_FEN,
    MAX_POLICY_COUNT,
    MAX_POLICY_DAYS,
    MAX_PRICE_CEILING_FEN,
    MAX_PRICE_FEN,
    MIN_PRICE_FEN,
)
from services.kernel.contract.policy import (
    BP_DENOMINATOR,
    PolicyError,
    Rounding,
    default_policy,
    policy_from_dict,
    policy_from_proto,
    policy_to_dict,
    policy_to_proto,
    quote,
)
from services.kernel.errors import InvalidArgument
from subsidy.v1 import catalog_pb2

# ---- serials and IMEIs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "AB12CD34",
        "ab12cd34",
        "AB-12-CD-34",
        "AB.12.CD.34",
        "AB_12_CD_34",
        "AB:12:CD:34",
        " ab 12 cd 34 ",
        "a.b-1_2:c d.3.4",
        "AB12CD34.",
        ".AB12CD34",
    ],
)
def test_every_spelling_of_a_serial_is_the_same_unit(spelling: str) -> None:
    assert validate.serial("serial", spelling) == "AB12CD34"


def test_an_imei_with_separators_is_its_fifteen_digits() -> None:
    for spelling in ("35-209900-176148-1", "35.209900.176148.1", "35:20:99:00:17:61:48:1"):
        assert validate.serial("serial", spelling) == "352099001761481"


@pytest.mark.parametrize(
    "spelling",
    [
        "SSN1",  # what "ßN1".upper() would become
        "IN1",  # what "ıN1".upper() would become
        "FFN1",  # what "ﬀN1".upper() would become
    ],
)
def test_a_non_ascii_letter_cannot_become_a_second_spelling(spelling: str) -> None:
    lookalike = {"SSN1": "ßn1", "IN1": "ın1", "FFN1": "ﬀn1"}[spelling]
    assert validate.serial("serial", spelling) == spelling
    with pytest.raises(InvalidArgument) as err:
        validate.serial("serial", lookalike)
    assert (err.value.reason, err.value.field) == ("INVALID_IDENTIFIER", "serial")


@pytest.mark.parametrize("bad", ["", " ", "-", ".:_", "IMEI/1", "A\tB", "１２３"])
def test_a_serial_with_nothing_left_or_other_characters_is_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.serial("serial", bad)
    assert err.value.field == "serial"
    assert err.value.reason in ("MISSING_FIELD", "INVALID_IDENTIFIER")


def test_a_serial_is_at_most_64_characters_after_canonicalisation() -> None:
    assert validate.serial("serial", "-".join(["A" * 16] * 4)) == "A" * 64
    with pytest.raises(InvalidArgument) as err:
        validate.serial("serial", "A" * 65)
    assert err.value.reason == "FIELD_TOO_LONG"


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=20), st.data())
def test_separators_anywhere_never_make_a_second_unit(core: str, data: st.DataObject) -> None:
    spelled = "".join(
        data.draw(st.sampled_from(["", "-", ".", "_", ":", " "])) + c.lower()
        if data.draw(st.booleans())
        else c
        for c in core
    )
    assert validate.serial("serial", spelled) == core


# ---- a policy's amounts ----------------------------------------------------------------------


def _largest_policy() -> dict[str, Any]:
    """The default policy with every amount, rate, count and span at the most it may be."""
    data = copy.deepcopy(policy_to_dict(default_policy()))
    data["rounding"] = Rounding.HALF_UP.value  # rounds up: the larger of the two
    data["price_tolerance_bp"] = BP_DENOMINATOR
    data["baseline_window_days"] = MAX_POLICY_DAYS
    data["qualification_validity_days"] = MAX_POLICY_DAYS
    data["reclaim_limit"] = MAX_POLICY_COUNT
    for category in data["categories"]:
        category["grades"] = {str(g): BP_DENOMINATOR for g in range(1, 6)}
        category["no_grade_rate_bp"] = BP_DENOMINATOR
        category["cap_fen"] = MAX_CAP_FEN
        category["price_ceiling_fen"] = MAX_PRICE_CEILING_FEN
        category["per_person_limit"] = MAX_POLICY_COUNT
        category["daily_quota"] = MAX_POLICY_COUNT
    return data


LARGEST = policy_from_dict(_largest_policy())


@given(
    code=st.sampled_from(LARGEST.category_codes),
    grade=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
    price=st.one_of(
        st.integers(min_value=MIN_PRICE_FEN, max_value=MAX_PRICE_FEN),
        st.just(MAX_PRICE_FEN),
    ),
)
def test_the_largest_allowed_policy_and_price_never_leave_int64(
    code: str, grade: int | None, price: int
) -> None:
    rule = LARGEST.category(code)
    assert rule is not None
    rate = rule.rate_bp_for(grade)
    assert rate is not None
    # The one product a quote computes, and (half-up) twice it plus the denominator.
    assert 2 * price * rate + BP_DENOMINATOR <= INT64_MAX
    q = quote(LARGEST, code, grade, price)
    assert q.eligible and q.subsidy_fen == price  # 100 %, capped at the largest price
    assert 0 <= q.subsidy_fen <= q.cap_fen <= INT64_MAX
    # Every figure fits the wire: protobuf raises ValueError for an int64 it cannot hold.
    message = catalog_pb2.QuoteResponse(
        eligible=q.eligible, subsidy_fen=q.subsidy_fen, rate_bp=q.rate_bp, cap_fen=q.cap_fen
    )
    assert catalog_pb2.QuoteResponse.FromString(message.SerializeToString()) == message


def test_the_largest_allowed_policy_survives_the_proto() -> None:
    # Counts and days are int32 on the wire: the bounds keep them there.
    assert policy_from_proto(policy_to_proto(LARGEST)) == LARGEST


@pytest.mark.parametrize(
    ("where", "key", "too_big", "problem"),
    [
        ("category", "cap_fen", MAX_CAP_FEN + 1, f"must be at most {MAX_CAP_FEN} fen"),
        (
            "category",
            "price_ceiling_fen",
            MAX_PRICE_CEILING_FEN + 1,
            f"must be at most {MAX_PRICE_CEILING_FEN} fen",
        ),
        ("category", "cap_fen", 2**63, f"must be at most {MAX_CAP_FEN} fen"),
        ("category", "per_person_limit", MAX_POLICY_COUNT + 1, f"at most {MAX_POLICY_COUNT}"),
        ("category", "daily_quota", 2**31, f"must be at most {MAX_POLICY_COUNT}"),
        ("category", "no_grade_rate_bp", BP_DENOMINATOR + 1, "must be an integer in 0..10000"),
        ("top", "reclaim_limit", MAX_POLICY_COUNT + 1, f"must be at most {MAX_POLICY_COUNT}"),
        ("top", "baseline_window_days", MAX_POLICY_DAYS + 1, f"at most {MAX_POLICY_DAYS} days"),
        ("top", "qualification_validity_days", 10**12, f"at most {MAX_POLICY_DAYS} days"),
        ("top", "price_tolerance_bp", BP_DENOMINATOR + 1, "must be an integer in 0..10000"),
    ],
)
def test_an_amount_above_its_bound_is_refused_naming_the_field(
    where: str, key: str, too_big: int, problem: str
) -> None:
    data = _largest_policy()
    target = data["categories"][2] if where == "category" else data
    target[key] = too_big
    with pytest.raises(PolicyError) as err:
        policy_from_dict(data)
    path = f"categories[2].{key}" if where == "category" else key
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


def test_a_rate_above_100_percent_is_refused_naming_the_grade() -> None:
    data = _largest_policy()
    data["categories"][0]["grades"]["1"] = BP_DENOMINATOR + 1
    with pytest.raises(PolicyError, match=r"^categories\[0\]\.grades\[1\]: "):
        policy_from_dict(data)
