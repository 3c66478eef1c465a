"""Ledger decisions (services/ledger/domain.py) under any sequence of commands.

Hypothesis drives fund / reserve / capture / release with valid and invalid amounts, reasons
and orders against a plain model of the money. After every step the pool balances
(check_budget_balanced), available never goes negative, the buckets equal the model's sums,
and every refusal is the precise error the API would map to a status.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.contract import budget
from services.contract.budget import Pool
from services.invariants import InvariantViolation, check_budget_balanced
from services.kernel.errors import (
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
