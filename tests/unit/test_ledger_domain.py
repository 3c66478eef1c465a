"""Ledger decisions (services/ledger/domain.py) under any sequence of commands.

Hypothesis drives fund / reserve / capture / release with valid and invalid amounts, reasons
and orders against a plain model of the money. After every step the pool balances
(check_budget_balanced), available never goes negative, the buckets equal the model's sums,
and every refusal is the precise error the API would map to a status.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.invariants import InvariantViolation, check_budget_balanced
from services.kernel.contract import budget
from services.kernel.contract.budget import Pool
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.ledger import domain
from services.ledger.domain import CAPTURED, PENDING, RELEASE_REASONS, RELEASED
from subsidy.v1 import events_pb2 as ev

POOL = "pool-1"
MAX = domain.MAX_FUNDING_FEN

amounts_to_fund = st.one_of(
    st.integers(1, 10**7),
    st.integers(-(10**6), 0),
    st.integers(MAX - 2, MAX + 2),
    st.integers(1, MAX),
)
amounts_to_reserve = st.one_of(
    st.integers(1, 10**6),
    st.integers(-(10**3), 0),
    st.integers(10**6, 10**15),
)
reserves = st.tuples(st.just("reserve"), amounts_to_reserve)
captures = st.tuples(st.just("capture"), st.integers(0, 1000))
releases = st.tuples(
    st.just("release"),
    st.integers(0, 1000),
    st.sampled_from((*RELEASE_REASONS, *RELEASE_REASONS, "BOGUS", "", "cancelled")),
)
# Usually funded first (sometimes not: reserving from a pool that does not exist is a case
# too), then mostly checkout commands, so reservations get paid, cancelled and refunded.
commands = st.tuples(
    st.lists(st.tuples(st.just("fund"), st.integers(1, 10**7)), max_size=2),
    st.lists(
        st.one_of(
            st.tuples(st.just("fund"), amounts_to_fund),
            reserves,
            reserves,
            captures,
            captures,
            releases,
            releases,
        ),
        max_size=60,
    ),
).map(lambda parts: parts[0] + parts[1])


@dataclass
class Model:
    """The pool as the decisions leave it, and what the money should add up to."""

    pool: Pool | None = None
    reservations: list[domain.Reservation] = field(default_factory=list)
    funded: int = 0

    def apply(self, events: list[Message]) -> None:
        assert self.pool is not None
        for event in events:
            self.pool = budget.apply(self.pool, event)

    def set_status(self, i: int, status: str) -> None:
        self.reservations[i] = replace(self.reservations[i], status=status)

    def check(self) -> None:
        if self.pool is None:
            return
        p = self.pool
        check_budget_balanced(
            POOL, funded=p.funded, available=p.available, reserved=p.reserved, spent=p.spent
        )
        assert p.available >= 0
        assert p.funded == self.funded
        assert p.reserved == sum(r.subsidy_fen for r in self.reservations if r.status == PENDING)
        assert p.spent == sum(r.subsidy_fen for r in self.reservations if r.status == CAPTURED)


def step_fund(m: Model, amount: int) -> None:
    try:
        events = domain.fund(m.pool or Pool(POOL), amount, "district")
    except InvalidArgument as err:
        assert not 1 <= amount <= MAX
        assert (err.reason, err.field) == ("INVALID_AMOUNT", "amount_fen")
        return
    assert 1 <= amount <= MAX
    m.pool = m.pool or Pool(POOL)
    m.apply(events)
    m.funded += amount


def step_reserve(m: Model, amount: int) -> None:
    order = f"o-{len(m.reservations)}"
    request = ev.SubsidyReserved(order_id=order, pool_id=POOL, subsidy_fen=amount)
    available = m.pool.available if m.pool else 0
    try:
        events = domain.reserve(m.pool, request)
    except NotFound as err:
        assert m.pool is None
        assert (err.reason, err.field) == ("UNKNOWN_POOL", "pool_id")
        return
    except FailedPrecondition as err:
        assert amount <= 0
        assert err.reason == "NO_SUBSIDY"
        return
    except ResourceExhausted as err:
        assert amount > available
        assert (err.reason, err.field) == ("BUDGET_EXHAUSTED", "pool_id")
        return
    assert 0 < amount <= available
    m.apply(events)
    m.reservations.append(domain.Reservation(order, POOL, amount, PENDING))


def step_capture(m: Model, pick: int) -> None:
    if not m.reservations:
        return
    i = pick % len(m.reservations)
    res = m.reservations[i]
    try:
        events = domain.capture(res, "pay-1")
    except FailedPrecondition as err:
        assert res.status == RELEASED
        assert (err.reason, err.field) == ("RESERVATION_NOT_PENDING", "order_id")
        return
    if res.status == CAPTURED:
        assert events == []  # idempotent
        return
    assert res.status == PENDING
    m.apply(events)
    m.set_status(i, CAPTURED)


def step_release(m: Model, pick: int, reason: str) -> None:
    if not m.reservations:
        return
    i = pick % len(m.reservations)
    res = m.reservations[i]
    try:
        events = domain.release(res, reason)
    except InvalidArgument as err:
        assert reason not in RELEASE_REASONS
        assert (err.reason, err.field) == ("INVALID_REASON", "reason")
        return
    except FailedPrecondition as err:
        if reason == "REFUNDED":
            assert res.status == PENDING
            assert (err.reason, err.field) == ("NOT_CAPTURED", "reason")
        else:
            assert res.status == CAPTURED
            assert (err.reason, err.field) == ("ALREADY_CAPTURED", "reason")
        return
    assert reason in RELEASE_REASONS
    if res.status == RELEASED:
        assert events == []  # idempotent
        return
    assert (reason == "REFUNDED") == (res.status == CAPTURED)
    m.apply(events)
    m.set_status(i, RELEASED)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_any_sequence_keeps_the_pool_balanced_and_never_overspends(
    steps: list[tuple[object, ...]],
) -> None:
    m = Model()
    for command in steps:
        match command:
            case ("fund", int(amount)):
                step_fund(m, amount)
            case ("reserve", int(amount)):
                step_reserve(m, amount)
            case ("capture", int(pick)):
                step_capture(m, pick)
            case ("release", int(pick), str(reason)):
                step_release(m, pick, reason)
            case _:
                raise AssertionError(command)
        m.check()


@given(available=st.integers(0, 10**12), extra=st.integers(1, 10**12))
def test_a_reserve_beyond_what_is_available_is_refused_as_budget_exhausted(
    available: int, extra: int
) -> None:
    pool = Pool(POOL, funded=available, available=available)
    too_much = ev.SubsidyReserved(order_id="o-1", pool_id=POOL, subsidy_fen=available + extra)
    with pytest.raises(ResourceExhausted) as err:
        domain.reserve(pool, too_much)
    assert (err.value.reason, err.value.field) == ("BUDGET_EXHAUSTED", "pool_id")
    if available:
        exactly = ev.SubsidyReserved(order_id="o-2", pool_id=POOL, subsidy_fen=available)
        after = budget.apply(pool, domain.reserve(pool, exactly)[0])
        assert (after.available, after.reserved) == (0, available)


@given(available=st.integers(0, 10**9), extra=st.integers(1, 10**9))
def test_the_fold_itself_refuses_an_overdraw(available: int, extra: int) -> None:
    """Even an event that bypassed reserve() cannot push available below zero unnoticed."""
    pool = Pool(POOL, funded=available, available=available)
    with pytest.raises(InvariantViolation):
        budget.apply(pool, ev.SubsidyReserved(pool_id=POOL, subsidy_fen=available + extra))


# -- the checkout's commands, decided on the state read under the pool's lock ----------------

RESERVE = domain.Reserve(
    order_id="o-1",
    platform_id="jd",
    pool_id=POOL,
    consumer_id="c-1",
    qualification_id="q-1",
    sku="fridge-1",
    unit_price_fen=400_000,
    serial="SN1",
)
ITEM = domain.Item(
    merchant_id="m-1", category="refrigerator", subsidy_fen=60_000, policy_version="v1"
)
EXPIRES = dt.datetime(2025, 6, 1, 3, 0, tzinfo=dt.UTC)


def test_a_hold_reserves_the_items_subsidy_for_the_order_until_it_expires() -> None:
    pool = Pool(POOL, funded=100_000, available=100_000)
    [held] = domain.hold(domain.Hold(pool, refused=False), RESERVE, ITEM, EXPIRES)
    assert isinstance(held, ev.SubsidyReserved)
    assert (held.order_id, held.subsidy_fen, held.merchant_id, held.serial) == (
        "o-1",
        60_000,
        "m-1",
        "SN1",
    )
    assert held.expires_at.ToDatetime(tzinfo=EXPIRES.tzinfo) == EXPIRES
    after = domain.evolve(None, held)
    assert after is not None and after.status == PENDING


def test_an_order_refused_for_good_is_never_held() -> None:
    pool = Pool(POOL, funded=100_000, available=100_000)
    with pytest.raises(FailedPrecondition) as err:
        domain.hold(domain.Hold(pool, refused=True), RESERVE, ITEM, EXPIRES)
    assert err.value.reason == "ORDER_REFUSED"


def test_a_hold_the_pool_cannot_pay_is_refused() -> None:
    with pytest.raises(ResourceExhausted) as err:
        domain.hold(domain.Hold(Pool(POOL, 59_999, 59_999), False), RESERVE, ITEM, EXPIRES)
    assert err.value.reason == "BUDGET_EXHAUSTED"
    with pytest.raises(NotFound):
        domain.hold(domain.Hold(None, False), RESERVE, ITEM, EXPIRES)


def test_a_retried_order_must_be_the_same_order() -> None:
    domain.same_order(RESERVE, replace(RESERVE, serial="", platform_id="jd"))
    for changed in (
        replace(RESERVE, sku="fridge-2"),
        replace(RESERVE, unit_price_fen=1),
        replace(RESERVE, qualification_id="q-2"),
        replace(RESERVE, consumer_id="c-2"),
        replace(RESERVE, pool_id="pool-2"),
    ):
        with pytest.raises(AlreadyExists) as err:
            domain.same_order(RESERVE, changed)
        assert err.value.reason == "ORDER_ID_REUSED"


def test_a_refusal_is_written_unless_a_concurrent_attempt_holds_the_order() -> None:
    [refused] = domain.refuse(False, "o-1", POOL, "q-1", "ABANDONED")
    assert isinstance(refused, ev.ReservationRefused) and refused.reason == "ABANDONED"
    assert domain.refuse(True, "o-1", POOL, "q-1", "ABANDONED") == []


def test_funding_is_idempotent_on_its_key_and_refuses_the_key_for_another_funding() -> None:
    cmd = domain.Fund(POOL, 5_000, "district", "key-1")
    [funded] = domain.fund_once(domain.Funding(None), cmd)
    assert isinstance(funded, ev.BudgetFunded) and funded.idempotency_key == "key-1"
    pool = budget.apply(Pool(POOL), funded)
    assert domain.fund_once(domain.Funding(pool, (POOL, 5_000)), cmd) == []
    with pytest.raises(AlreadyExists) as err:
        domain.fund_once(domain.Funding(pool, (POOL, 4_000)), cmd)
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(InvalidArgument):  # the amount is judged first, key or not
        domain.fund_once(domain.Funding(pool, (POOL, 5_000)), replace(cmd, amount_fen=0))


def test_a_reservations_status_changes_only_by_its_events() -> None:
    res = domain.Reservation("o-1", POOL, 60_000, PENDING)
    captured = domain.evolve(res, ev.SubsidyCaptured(order_id="o-1"))
    assert captured is not None and captured.status == CAPTURED
    released = domain.evolve(captured, ev.SubsidyReleased(order_id="o-1", reason="REFUNDED"))
    assert released is not None and released.status == RELEASED
    assert domain.evolve(None, ev.SubsidyCaptured(order_id="o-1")) is None
    with pytest.raises(NotFound):
        domain.capture(None, "pay-1")
