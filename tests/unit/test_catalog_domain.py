"""Catalog decisions without I/O: the price baseline, the item verdict, maker-checker, masking."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.catalog import domain
from services.catalog.domain import ItemFacts, Pause, PolicyRecord, Switches
from services.contract.policy import default_policy
from services.kernel.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
POLICY = default_policy()
APPROVER = common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-wang")


def refused(exc: DomainError, cls: type[DomainError], reason: str, field: str) -> None:
    assert (type(exc), exc.reason, exc.field) == (cls, reason, field)


# -- the price baseline ----------------------------------------------------------------------


def test_a_recent_raise_does_not_move_the_baseline() -> None:
    history = [(NOW - 89 * DAY, 100_000), (NOW - DAY, 130_000)]
    assert domain.price_baseline(history, NOW, 90) == 100_000


def test_a_price_held_for_most_of_the_window_becomes_the_baseline() -> None:
    history = [(NOW - 89 * DAY, 100_000), (NOW - 50 * DAY, 130_000)]
    assert domain.price_baseline(history, NOW, 90) == 130_000


def test_only_prices_inside_the_window_count() -> None:
    # 200,000 for years, 100,000 for the last 60 of 90 days: the old price weighs 30 days.
    history = [(NOW - 900 * DAY, 200_000), (NOW - 60 * DAY, 100_000)]
    assert domain.price_baseline(history, NOW, 90) == 100_000
    assert domain.price_baseline(history, NOW, 119) == 100_000  # 59 days against 60
    assert domain.price_baseline(history, NOW, 121) == 200_000  # 61 days of 200,000 vs 60


def test_no_history_no_baseline_and_a_brand_new_price_is_its_own() -> None:
    assert domain.price_baseline([], NOW, 90) is None
    assert domain.price_baseline([(NOW, 5_000)], NOW, 90) == 5_000


def test_price_limit_adds_the_tolerance_rounded_down() -> None:
    assert domain.price_limit(100_000, 1000) == 110_000
    assert domain.price_limit(99_999, 1000) == 109_998  # 9,999.9 fen rounds down
    assert domain.price_limit(100_000, 0) == 100_000


histories = st.lists(
    st.tuples(st.integers(0, 400 * 24), st.integers(1, 10**7)), min_size=1, max_size=12
).map(lambda xs: sorted((NOW - dt.timedelta(hours=h), p) for h, p in xs))


@given(histories, st.integers(1, 365))
def test_the_baseline_is_one_of_the_prices_in_force_in_the_window(
    history: list[tuple[dt.datetime, int]], window: int
) -> None:
    baseline = domain.price_baseline(history, NOW, window)
    start = NOW - dt.timedelta(days=window)
    in_window = [p for i, (at, p) in enumerate(history) if at >= start] + [
        p
        for i, (at, p) in enumerate(history)
        if at < start and (i + 1 == len(history) or history[i + 1][0] > start)
    ]
    assert baseline in {p for _, p in history}
    assert min(in_window) <= baseline <= max(in_window)


@given(histories, st.integers(1, 365), st.integers(2, 5))
def test_the_baseline_scales_with_every_price(
    history: list[tuple[dt.datetime, int]], window: int, factor: int
) -> None:
    scaled = [(at, p * factor) for at, p in history]
    base = domain.price_baseline(history, NOW, window)
    assert base is not None
    assert domain.price_baseline(scaled, NOW, window) == base * factor


# -- the item verdict ------------------------------------------------------------------------


def facts(**kw: object) -> ItemFacts:
    fields: dict[str, object] = dict(
        sku="s",
        category="refrigerator",
        grade=1,
        merchant_id="m",
        merchant_status="APPROVED",
        product_status="LISTED",
        price_history=((NOW - 30 * DAY, 1_000_000),),
    )
    return ItemFacts(**{**fields, **kw})  # type: ignore[arg-type]


def test_an_eligible_item_carries_its_quote() -> None:
    v = domain.verdict(POLICY, facts(), Switches(), 1_000_000, NOW)
    assert (v.eligible, v.reasons, v.subsidy_fen, v.baseline_fen, v.price_limit_fen) == (
        True,
        (),
        200_000,
        1_000_000,
        1_100_000,
    )


def test_every_reason_at_once_in_the_documented_order() -> None:
    paused = Pause("r", "op", NOW)
    switches = Switches(paused, {"tv": paused})
    item = facts(
        category="tv",
        grade=3,
        merchant_status="SUSPENDED",
        product_status="DELISTED",
        serial_order="order-000123456",
        serial_order_status="CAPTURED",
    )
    v = domain.verdict(POLICY, item, switches, 1_200_000, NOW)
    assert v.reasons == (
        "CAMPAIGN_PAUSED",
        "CATEGORY_PAUSED",
        "MERCHANT_SUSPENDED",
        "PRODUCT_DELISTED",
        "GRADE_NOT_ELIGIBLE",
        "PRICE_ABOVE_BASELINE",
        "SERIAL_ALREADY_SUBSIDISED",
    )
    assert (v.eligible, v.subsidy_fen, v.serial_bound_order) == (False, 0, "or*********3456")


def test_unknown_sku_and_the_merchant_states() -> None:
    assert domain.verdict(POLICY, None, Switches(), 100, NOW).reasons == ("UNKNOWN_SKU",)
    for status in ("APPLIED", "REJECTED", ""):
        v = domain.verdict(POLICY, facts(merchant_status=status), Switches(), 1_000_000, NOW)
        assert v.reasons == ("MERCHANT_NOT_APPROVED",)
    pending = facts(serial_order="o-1234567", serial_order_status="RESERVED")
    assert domain.verdict(POLICY, pending, Switches(), 1_000_000, NOW).reasons == (
        "SERIAL_RESERVED",
    )


@given(st.integers(1, 10**10))
def test_no_item_above_its_limit_is_ever_eligible(price: int) -> None:
    v = domain.verdict(POLICY, facts(), Switches(), price, NOW)
    assert v.eligible == (price <= 1_100_000)
    assert 0 <= v.subsidy_fen <= 200_000


# -- maker-checker ---------------------------------------------------------------------------


def draft(version: str = "v2", drafted_by: str = "op-li", status: str = "DRAFT") -> PolicyRecord:
    return PolicyRecord(version, status, NOW + DAY, drafted_by)


def test_approval_by_another_approver_publishes() -> None:
    events = domain.approve_policy(draft(), "{}", APPROVER, "ok", NOW)
    assert [type(e) for e in events] == [ev.PolicyApproved, ev.PolicyPublished]
    assert events[0].drafted_by == "op-li"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("record", "actor", "now", "cls", "reason", "field"),
    [
        (None, APPROVER, NOW, NotFound, "UNKNOWN_POLICY_VERSION", "version"),
        (
            draft(drafted_by="ap-wang"),
            APPROVER,
            NOW,
            PermissionDenied,
            "MAKER_CHECKER",
            "actor.id",
        ),
        (
            draft(),
            common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="x"),
            NOW,
            PermissionDenied,
            "APPROVER_ROLE_REQUIRED",
            "actor.kind",
        ),
        (
            draft(status="APPROVED"),
            APPROVER,
            NOW,
            FailedPrecondition,
            "POLICY_ALREADY_APPROVED",
            "version",
        ),
        (draft(), APPROVER, NOW + 2 * DAY, FailedPrecondition, "EFFECTIVE_FROM_PASSED", "version"),
    ],
)
def test_approval_refusals(
    record: PolicyRecord | None,
    actor: common_pb2.Actor,
    now: dt.datetime,
    cls: type[DomainError],
    reason: str,
    field: str,
) -> None:
    with pytest.raises(DomainError) as err:
        domain.approve_policy(record, "{}", actor, "r", now)
    refused(err.value, cls, reason, field)


def test_drafting_refusals() -> None:
    with pytest.raises(DomainError) as err:
        domain.draft_policy(draft(), POLICY, "{}", "r", NOW)
    refused(err.value, AlreadyExists, "POLICY_VERSION_EXISTS", "document.version")
    with pytest.raises(DomainError) as err:
        domain.draft_policy(None, POLICY, "{}", "r", NOW)  # the default took effect in 2025-01
    refused(err.value, InvalidArgument, "EFFECTIVE_FROM_PASSED", "document.effective_from")


# -- state machines and masking --------------------------------------------------------------


def test_merchant_state_machine() -> None:
    assert domain.suspend_merchant("m", "APPROVED", "r")
    assert domain.reinstate_merchant("m", "SUSPENDED", "r")
    for status, reason in [
        ("APPLIED", "MERCHANT_NOT_APPROVED"),
        ("REJECTED", "MERCHANT_NOT_APPROVED"),
        ("SUSPENDED", "MERCHANT_ALREADY_SUSPENDED"),
    ]:
        with pytest.raises(FailedPrecondition) as err:
            domain.suspend_merchant("m", status, "r")
        assert err.value.reason == reason
    with pytest.raises(FailedPrecondition) as err:
        domain.reinstate_merchant("m", "APPROVED", "r")
    assert err.value.reason == "MERCHANT_NOT_SUSPENDED"


def test_switches_refuse_no_ops() -> None:
    paused = Switches(Pause("r", "op", NOW), {"tv": Pause("r", "op", NOW)})
    with pytest.raises(FailedPrecondition, match="paused already"):
        domain.pause_category(paused, POLICY, "tv", "r")
    with pytest.raises(FailedPrecondition):
        domain.pause_campaign(paused, "r")
    with pytest.raises(FailedPrecondition):
        domain.resume_category(Switches(), "tv", "r")
    with pytest.raises(InvalidArgument):
        domain.pause_category(Switches(), POLICY, "toaster", "r")


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=64))
def test_masked_references_never_reveal_the_middle(reference: str) -> None:
    masked = domain.mask_reference(reference)
    assert len(masked) == len(reference)
    if len(reference) > 6:
        assert masked[:2] == reference[:2] and masked[-4:] == reference[-4:]
        assert set(masked[2:-4]) == {"*"}
    else:
        assert set(masked) == {"*"}
