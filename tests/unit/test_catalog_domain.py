"""Catalog decisions without I/O: the price baseline, the item verdict, maker-checker, masking,
and each aggregate's evolve (how an event changes its state), read like the rules."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from services.catalog import domain
from services.catalog.domain import (
    ApplyMerchant,
    ApprovePolicy,
    ChangePrice,
    Delist,
    DraftPolicy,
    ItemFacts,
    Merchant,
    Meta,
    Pause,
    PauseCampaign,
    PauseCategory,
    PolicyRecord,
    Product,
    RegisterProduct,
    ReinstateMerchant,
    ResumeCampaign,
    ResumeCategory,
    ReviewMerchant,
    SuspendMerchant,
    Switches,
)
from services.kernel.contract.policy import default_policy, policy_of
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
    return PolicyRecord(
        replace(POLICY, version=version, effective_from=NOW + DAY), status, drafted_by
    )


def test_approval_by_another_approver_publishes() -> None:
    events = domain.approve_policy(draft(), ApprovePolicy("v2", APPROVER, "ok"), NOW)
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
        domain.approve_policy(record, ApprovePolicy("v2", actor, "r"), now)
    refused(err.value, cls, reason, field)


def test_drafting_refusals() -> None:
    with pytest.raises(DomainError) as err:
        domain.draft_policy(draft(), DraftPolicy(POLICY, "r"), NOW)
    refused(err.value, AlreadyExists, "POLICY_VERSION_EXISTS", "document.version")
    with pytest.raises(DomainError) as err:
        domain.draft_policy(
            None, DraftPolicy(POLICY, "r"), NOW
        )  # the default took effect in 2025-01
    refused(err.value, InvalidArgument, "EFFECTIVE_FROM_PASSED", "document.effective_from")


# -- state machines and masking --------------------------------------------------------------


def merchant(status: str) -> Merchant:
    return Merchant("m", "商行", "91440300MA5DC6QX4Y", "138****0000", status)


def test_merchant_state_machine() -> None:
    assert domain.suspend_merchant(merchant("APPROVED"), SuspendMerchant("m", "r"))
    assert domain.reinstate_merchant(merchant("SUSPENDED"), ReinstateMerchant("m", "r"))
    for status, reason in [
        ("APPLIED", "MERCHANT_NOT_APPROVED"),
        ("REJECTED", "MERCHANT_NOT_APPROVED"),
        ("SUSPENDED", "MERCHANT_ALREADY_SUSPENDED"),
    ]:
        with pytest.raises(FailedPrecondition) as err:
            domain.suspend_merchant(merchant(status), SuspendMerchant("m", "r"))
        assert err.value.reason == reason
    with pytest.raises(FailedPrecondition) as err:
        domain.reinstate_merchant(merchant("APPROVED"), ReinstateMerchant("m", "r"))
    assert err.value.reason == "MERCHANT_NOT_SUSPENDED"


def test_switches_refuse_no_ops() -> None:
    paused = Switches(Pause("r", "op", NOW), {"tv": Pause("r", "op", NOW)})
    with pytest.raises(FailedPrecondition, match="paused already"):
        domain.pause_category(paused, PauseCategory("tv", "r"), POLICY)
    with pytest.raises(FailedPrecondition):
        domain.pause_campaign(paused, PauseCampaign("r"))
    with pytest.raises(FailedPrecondition):
        domain.resume_category(Switches(), ResumeCategory("tv", "r"))
    with pytest.raises(InvalidArgument):
        domain.pause_category(Switches(), PauseCategory("toaster", "r"), POLICY)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=64))
def test_masked_references_never_reveal_the_middle(reference: str) -> None:
    masked = domain.mask_reference(reference)
    assert len(masked) == len(reference)
    if len(reference) > 6:
        assert masked[:2] == reference[:2] and masked[-4:] == reference[-4:]
        assert set(masked[2:-4]) == {"*"}
    else:
        assert set(masked) == {"*"}


# -- evolve: how each event changes its aggregate ---------------------------------------------

OP = Meta(NOW, "op-li")
S = TypeVar("S")


def history(
    decisions: Sequence[Callable[[S | None], Sequence[Message]]],
    evolve: Callable[[S | None, Message], S],
) -> S | None:
    """Decide each command on the state so far and apply its events: what the pipeline does."""
    state: S | None = None
    for decide in decisions:
        for event in decide(state):
            state = evolve(state, event)
    return state


def test_a_merchant_applies_is_approved_suspended_and_reinstated() -> None:
    applied = ApplyMerchant("m", "商行", "91440300MA5DC6QX4Y", "138****0000")
    m = history([lambda s: domain.apply_merchant(s, applied)], domain.merchant.evolve)
    assert m is not None and (m.status, m.contact_masked) == ("APPLIED", "138****0000")
    steps: list[tuple[Callable[[Merchant | None], Sequence[Message]], str, str]] = [
        (lambda s: domain.review_merchant(s, ReviewMerchant("m", True, "")), "APPROVED", ""),
        (lambda s: domain.suspend_merchant(s, SuspendMerchant("m", "假")), "SUSPENDED", "假"),
        (lambda s: domain.reinstate_merchant(s, ReinstateMerchant("m", "改")), "APPROVED", "改"),
    ]
    for decide, status, reason in steps:
        [event] = decide(m)
        m = domain.merchant.evolve(m, event)
        assert (m.status, m.status_reason) == (status, reason)


def test_a_rejected_merchant_keeps_the_reason_and_cannot_be_reviewed_again() -> None:
    rejected = domain.merchant.evolve(
        merchant("APPLIED"), ev.MerchantReviewed(merchant_id="m", approved=False, reason="过期")
    )
    assert (rejected.status, rejected.status_reason) == ("REJECTED", "过期")
    with pytest.raises(FailedPrecondition) as err:
        domain.review_merchant(rejected, ReviewMerchant("m", True, ""))
    refused(err.value, FailedPrecondition, "MERCHANT_ALREADY_REVIEWED", "merchant_id")


def test_merchant_refusals_name_the_merchant() -> None:
    decisions: list[Callable[[], list[Message]]] = [
        lambda: domain.review_merchant(None, ReviewMerchant("m", True, "")),
        lambda: domain.suspend_merchant(None, SuspendMerchant("m", "r")),
        lambda: domain.reinstate_merchant(None, ReinstateMerchant("m", "r")),
    ]
    for decide in decisions:
        with pytest.raises(DomainError) as err:
            decide()
        refused(err.value, NotFound, "UNKNOWN_MERCHANT", "merchant_id")
    again = ApplyMerchant("m", "n", "l", "c")
    with pytest.raises(DomainError) as err:
        domain.apply_merchant(merchant("APPLIED"), again)
    refused(err.value, AlreadyExists, "MERCHANT_EXISTS", "merchant_id")


FRIDGE = RegisterProduct("s1", "m", "refrigerator", 1, "海尔", "BCD", "", 300_000)


def test_a_product_is_listed_repriced_and_delisted_for_good() -> None:
    p = history(
        [
            lambda s: domain.register_product(s, FRIDGE, POLICY, True),
            lambda s: domain.change_price(s, ChangePrice("s1", 280_000, "促销")),
        ],
        domain.product.evolve,
    )
    assert p is not None and (p.status, p.list_price_fen) == ("LISTED", 280_000)
    [gone] = domain.delist(p, Delist("s1", "停产"))
    p = domain.product.evolve(p, gone)
    assert (p.status, p.list_price_fen) == ("DELISTED", 280_000)
    refusals: list[tuple[Callable[[], list[Message]], str]] = [
        (lambda: domain.delist(p, Delist("s1", "r")), "PRODUCT_ALREADY_DELISTED"),
        (lambda: domain.change_price(p, ChangePrice("s1", 1, "r")), "PRODUCT_DELISTED"),
    ]
    for decide, reason in refusals:
        with pytest.raises(DomainError) as err:
            decide()
        refused(err.value, FailedPrecondition, reason, "sku")


def test_registration_refusals_in_the_order_they_are_checked() -> None:
    listed = Product("s1", "m", "refrigerator", 1, "b", "m", "", 1, "LISTED")
    toaster = replace(FRIDGE, category="toaster")
    cases: list[tuple[Callable[[], object], type[DomainError], str, str]] = [
        (
            lambda: domain.register_product(listed, toaster, POLICY, False),
            InvalidArgument,
            "UNKNOWN_CATEGORY",
            "category",
        ),
        (
            lambda: domain.register_product(listed, FRIDGE, POLICY, False),
            NotFound,
            "UNKNOWN_MERCHANT",
            "merchant_id",
        ),
        (
            lambda: domain.register_product(listed, FRIDGE, POLICY, True),
            AlreadyExists,
            "PRODUCT_EXISTS",
            "sku",
        ),
        (
            lambda: domain.change_price(listed, ChangePrice("s1", 1, "r")),
            FailedPrecondition,
            "PRICE_UNCHANGED",
            "list_price_fen",
        ),
        (
            lambda: domain.change_price(None, ChangePrice("s9", 5, "r")),
            NotFound,
            "UNKNOWN_SKU",
            "sku",
        ),
    ]
    for decide, cls, reason, field in cases:
        with pytest.raises(DomainError) as err:
            decide()
        refused(err.value, cls, reason, field)


def test_a_pause_records_who_and_since_when_and_a_resume_lifts_only_it() -> None:
    later = Meta(NOW + DAY, "op-zhao")
    s = Switches()
    steps: list[tuple[Callable[[Switches], list[Message]], Meta]] = [
        (lambda s: domain.pause_category(s, PauseCategory("tv", "质量"), POLICY), OP),
        (lambda s: domain.pause_campaign(s, PauseCampaign("应急")), later),
    ]
    for decide, meta in steps:
        [event] = decide(s)
        s = domain.switches.evolve(s, event, meta)
    assert s.categories == {"tv": Pause("质量", "op-li", NOW)}
    assert s.campaign == Pause("应急", "op-zhao", NOW + DAY)
    [resumed] = domain.resume_campaign(s, ResumeCampaign("恢复"))
    s = domain.switches.evolve(s, resumed, OP)
    assert (s.campaign, list(s.categories)) == (None, ["tv"])
    [resumed] = domain.resume_category(s, ResumeCategory("tv", "已排查"))
    assert domain.switches.evolve(s, resumed, OP) == Switches()


def test_a_draft_becomes_approved_by_its_checker_and_publishes_the_same_document() -> None:
    v2 = replace(POLICY, version="v2", effective_from=NOW + DAY)
    [drafted] = domain.draft_policy(None, DraftPolicy(v2, "新规"), NOW)
    record = domain.policy_version.evolve(None, drafted, OP)
    assert (record.status, record.drafted_by, record.draft_reason, record.policy) == (
        "DRAFT",
        "op-li",
        "新规",
        v2,
    )
    approved, published = domain.approve_policy(record, ApprovePolicy("v2", APPROVER, "ok"), NOW)
    record = domain.policy_version.evolve(record, approved, Meta(NOW, "ap-wang"))
    assert (record.status, record.approved_by, record.approve_reason) == (
        "APPROVED",
        "ap-wang",
        "ok",
    )
    assert domain.policy_version.evolve(record, published, Meta(NOW, "ap-wang")) == record
    # The event carries the policy as its proto message, converting back to the same rules.
    assert isinstance(published, ev.PolicyPublished)
    assert published.HasField("policy") and published.policy_json == ""
    assert policy_of(published) == v2


def test_the_shipped_default_is_published_once_and_approved_by_the_service() -> None:
    [published] = domain.publish_default(None, POLICY)
    record = domain.policy_version.evolve(None, published, Meta(NOW, "catalog"))
    assert (record.status, record.drafted_by, record.approved_by) == (
        "APPROVED",
        "catalog",
        "catalog",
    )
    assert domain.publish_default(record, POLICY) == []  # another replica got there first
