"""Funding sources, the split rules, tranches, sub-budgets and thresholds (services/ledger/domain.py
and the budget fold, services/kernel/contract/budget.py), pure.

The property drives random fund / tranche / reserve / capture / release / refund sequences over
a pool of several sources, under random funding rules, against a plain model of each source's
money; the tests after it read like the rules.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.invariants import InvariantViolation, check_budget_balanced, check_source_parts
from services.kernel.contract import budget
from services.kernel.contract.budget import Pool, Source, split_priority, split_pro_rata
from services.kernel.contract.policy import FundingRules, Split
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.ledger import domain
from services.ledger.domain import CAPTURED, PENDING, RELEASED, CategoryUse, Settle, Tranche
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

POOL = "pool-1"
SOURCES = ("district", "platform-matching", "province")
CATEGORIES = ("phone", "tv", "projector")
T0 = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.UTC)


def sources(*figures: tuple[str, int, int]) -> Pool:
    """A pool of sources given as (name, funded, available): the rest of funded is spent."""
    listed = tuple(Source(n, f, a, 0, f - a) for n, f, a in figures)
    return Pool(
        POOL,
        sum(s.funded for s in listed),
        sum(s.available for s in listed),
        0,
        sum(s.spent for s in listed),
        0,
        listed,
    )


def parts(event: Message) -> tuple[tuple[str, int], ...]:
    assert isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased)
    return budget.parts_of(event.sources)


# --------------------------------------------------------------------------------------------
# The property: any sequence keeps every source balanced, and every subsidy's parts add up


@dataclass
class World:
    """The pool as the decisions leave it, and what each source's money should add up to."""

    rules: FundingRules
    pool: Pool | None = None
    now: dt.datetime = T0
    orders: dict[str, domain.Reservation] = field(default_factory=dict)
    uses: dict[str, CategoryUse] = field(default_factory=dict)
    pending: list[domain.ScheduledTranche] = field(default_factory=list)
    alerted: set[tuple[str, int]] = field(default_factory=set)
    released: Counter[str] = field(default_factory=Counter)  # funded per source, the model's
    scheduled: Counter[str] = field(default_factory=Counter)
    log: list[Message] = field(default_factory=list)
    fundings: int = 0

    def apply(self, events: list[Message]) -> None:
        for event in events:
            self.pool = budget.apply(self.pool or Pool(POOL), event, self.held(event))
            self.log.append(event)
            if isinstance(event, ev.BudgetFunded):
                new = domain.scheduled(event)
                self.pending += new
                if new:
                    self.scheduled[event.source] += event.amount_fen
                else:
                    self.released[event.source] += event.amount_fen
            elif isinstance(event, ev.TrancheReleased):
                self.pending = [
                    t
                    for t in self.pending
                    if (t.funding_key, t.index) != (event.funding_key, event.index)
                ]
                self.scheduled[event.source] -= event.amount_fen
                self.released[event.source] += event.amount_fen
            elif isinstance(event, ev.BudgetThresholdReached):
                key = (event.category, event.threshold_bp)
                assert key not in self.alerted, f"{key} raised twice"
                self.alerted.add(key)
            elif isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased):
                res = self.orders.get(event.order_id)
                after = domain.evolve(res, event)
                assert after is not None
                self.orders[event.order_id] = after
                use = self.uses.get(after.category, CategoryUse(after.category))
                self.uses[after.category] = domain.evolve_use(use, event)

    def held(self, event: Message) -> budget.Parts | None:
        res = self.orders.get(getattr(event, "order_id", ""))
        return res.sources if res is not None else None

    def check(self) -> None:
        if self.pool is None:
            return
        p = self.pool
        check_budget_balanced(
            POOL, funded=p.funded, available=p.available, reserved=p.reserved, spent=p.spent
        )
        for name in SOURCES:
            s = p.source(name) or Source(name)
            check_budget_balanced(
                name, funded=s.funded, available=s.available, reserved=s.reserved, spent=s.spent
            )
            assert s.available >= 0
            held = [r for r in self.orders.values() if r.status == PENDING]
            paid = [r for r in self.orders.values() if r.status == CAPTURED]
            assert s.reserved == sum(dict(r.sources).get(name, 0) for r in held)
            assert s.spent == sum(dict(r.sources).get(name, 0) for r in paid)
            assert (s.funded, s.scheduled) == (self.released[name], self.scheduled[name])
        assert (p.funded, p.scheduled) == (
            sum(self.released.values()),
            sum(self.scheduled.values()),
        )
        for r in self.orders.values():
            check_source_parts(r.order_id, r.subsidy_fen, r.sources)
        for code, use in self.uses.items():
            share = self.rules.sub_budget_bp(code)
            if share is not None:  # funded only grows: what was within the cap stays within
                assert use.reserved + use.spent <= p.funded * share // 10_000


def step_fund(w: World, source: int, amount: int, tranches: list[tuple[int, int]]) -> None:
    w.fundings += 1
    schedule = tuple(Tranche(fen, T0 + dt.timedelta(hours=h)) for h, fen in tranches)
    if schedule:  # the instalments are the amount
        amount = sum(t.amount_fen for t in schedule)
    cmd = domain.Fund(POOL, amount, SOURCES[source], f"f-{w.fundings}", schedule)
    try:
        events = domain.fund_once(domain.Funding(w.pool), cmd, w.now)
    except InvalidArgument as err:
        assert err.reason in ("INVALID_AMOUNT", "INVALID_TRANCHES")
        assert not 1 <= amount <= domain.MAX_FUNDING_FEN or any(t.amount_fen <= 0 for t in schedule)
        return
    w.apply(events)


def step_tick(w: World, hours: int) -> None:
    w.now += dt.timedelta(hours=hours)
    due = [t for t in w.pending if t.releases_at <= w.now]
    events = domain.release_due(list(w.pending), w.now)
    assert len(events) == len(due)
    w.apply(events)
    assert all(t.releases_at > w.now for t in w.pending)


def step_reserve(w: World, category: int, amount: int) -> None:
    order = f"o-{len(w.orders)}"
    code = CATEGORIES[category]
    use = w.uses.get(code)
    reserved = ev.SubsidyReserved(order_id=order, pool_id=POOL, category=code, subsidy_fen=amount)
    pool = w.pool
    try:
        events = domain.reserve(pool, reserved, w.rules, use)
    except NotFound as err:
        assert pool is None and err.reason == "UNKNOWN_POOL"
        return
    except FailedPrecondition as err:
        assert amount <= 0 and err.reason == "NO_SUBSIDY"
        return
    except ResourceExhausted as err:
        assert pool is not None
        share = w.rules.sub_budget_bp(code)
        used = (use.reserved + use.spent) if use else 0
        if err.reason == "BUDGET_EXHAUSTED":
            assert amount > pool.available
        elif err.reason == "SUB_BUDGET_EXHAUSTED":
            assert share is not None and used + amount > pool.funded * share // 10_000
            assert err.metadata["category"] == code
        else:
            assert err.reason == "SOURCE_EXHAUSTED" and w.rules.split is Split.PRO_RATA
            short = pool.source(err.metadata["source"])
            assert short is not None
            assert dict(split_pro_rata(pool.payers(), amount))[short.source] > short.available
        return
    assert pool is not None and 0 < amount <= pool.available
    [held] = events
    check_source_parts(order, amount, parts(held))
    w.apply(events)


def step_capture(w: World, pick: int) -> None:
    if not w.orders:
        return
    res = list(w.orders.values())[pick % len(w.orders)]
    state = Settle(res, w.pool, w.uses.get(res.category), frozenset(w.alerted))
    try:
        events = domain.capture_and_alert(state, "pay-1", w.rules)
    except FailedPrecondition as err:
        assert res.status == RELEASED and err.reason == "RESERVATION_NOT_PENDING"
        return
    if res.status == CAPTURED:
        assert events == []
        return
    captured = events[0]
    assert isinstance(captured, ev.SubsidyCaptured)
    assert parts(captured) == res.sources  # what each source held is what it pays
    w.apply(events)


def step_release(w: World, pick: int, refund: bool) -> None:
    if not w.orders:
        return
    res = list(w.orders.values())[pick % len(w.orders)]
    try:
        events = domain.release(res, "REFUNDED" if refund else "CANCELLED")
    except FailedPrecondition:
        assert res.status == (PENDING if refund else CAPTURED)
        return
    if res.status == RELEASED:
        assert events == []
        return
    [released] = events
    assert parts(released) == res.sources  # back to the sources that held or paid it
    w.apply(events)


rules = st.builds(
    FundingRules,
    sources=st.just(SOURCES),
    split=st.sampled_from(Split),
    alert_thresholds_bp=st.sampled_from(((), (5000, 8000, 9500), (1, 10_000))),
    sub_budgets=st.sampled_from(((), (("phone", 3000),), (("phone", 1), ("projector", 10_000)))),
).flatmap(
    lambda r: st.permutations(list(SOURCES)).map(
        lambda order: replace(r, priority=tuple(order[:2])) if r.split is Split.PRIORITY else r
    )
)
amounts = st.one_of(st.integers(1, 60_000), st.integers(-10, 0), st.integers(10**6, 10**7))
fundings = st.tuples(
    st.just("fund"),
    st.integers(0, 2),
    st.one_of(st.integers(1, 400_000), st.integers(-5, 0), st.just(domain.MAX_FUNDING_FEN + 1)),
    st.lists(st.tuples(st.integers(-5, 48), st.integers(-1, 100_000)), max_size=3),
)
# Usually funded first (by one to three sources, sometimes in tranches), then mostly checkout
# commands, so reservations get split, paid, cancelled and refunded, and thresholds reached.
commands = st.tuples(
    st.lists(fundings, min_size=1, max_size=3),
    st.lists(
        st.one_of(
            fundings,
            st.tuples(st.just("tick"), st.integers(0, 24)),
            st.tuples(st.just("reserve"), st.integers(0, 2), amounts),
            st.tuples(st.just("reserve"), st.integers(0, 2), st.integers(1, 30_000)),
            st.tuples(st.just("reserve"), st.integers(0, 2), st.integers(1, 30_000)),
            st.tuples(st.just("capture"), st.integers(0, 1000)),
            st.tuples(st.just("capture"), st.integers(0, 1000)),
            st.tuples(st.just("release"), st.integers(0, 1000), st.booleans()),
        ),
        min_size=10,
        max_size=80,
    ),
).map(lambda parts: parts[0] + parts[1])


@settings(max_examples=400, deadline=None)
@given(rules, commands)
def test_any_sequence_keeps_every_source_balanced_and_every_subsidy_split_exactly(
    funding: FundingRules, steps: list[tuple[object, ...]]
) -> None:
    """At every step, for the pool and for each source: funded = available + reserved + spent,
    available ≥ 0, reserved and spent are exactly the parts of the orders held and paid, and
    each subsidy's source parts add up to it; no sub-budget overspent, no alert raised twice;
    and the auditor's fold of the whole log rebuilds the same pool."""
    w = World(funding)
    for command in steps:
        match command:
            case ("fund", int(source), int(amount), list(tranches)):
                step_fund(w, source, amount, tranches)
            case ("tick", int(hours)):
                step_tick(w, hours)
            case ("reserve", int(category), int(amount)):
                step_reserve(w, category, amount)
            case ("capture", int(pick)):
                step_capture(w, pick)
            case ("release", int(pick), bool(refund)):
                step_release(w, pick, refund)
            case _:
                raise AssertionError(command)
        w.check()
    assert budget.fold(POOL, w.log) == (w.pool or Pool(POOL))


# --------------------------------------------------------------------------------------------
# Split rules

PRO_RATA = FundingRules(sources=("district", "platform-matching"), split=Split.PRO_RATA)


def test_pro_rata_splits_a_subsidy_in_proportion_to_what_each_source_funded() -> None:
    pool = sources(("district", 1_000_000, 1_000_000), ("platform-matching", 250_000, 250_000))
    assert domain.split(pool, 45_000, PRO_RATA) == (
        ("district", 36_000),
        ("platform-matching", 9_000),
    )


def test_pro_rata_gives_the_fen_left_over_to_the_largest_remainders_then_the_first_funded() -> None:
    three = [Source(n, 1_000, 1_000) for n in ("a", "b", "c")]
    # 100 fen in thirds: 33 each and one fen left, all remainders equal: the first funded.
    assert split_pro_rata(three, 100) == (("a", 34), ("b", 33), ("c", 33))
    # 2 fen over 1:2 is 0.67 and 1.33: the larger remainder (a's) gets the fen.
    assert split_pro_rata([Source("a", 1, 1), Source("b", 2, 2)], 2) == (("a", 1), ("b", 1))
    # 5 fen over 3:7 is 1.5 and 3.5: equal remainders, the first funded gets it.
    assert split_pro_rata([Source("a", 3, 3), Source("b", 7, 7)], 5) == (("a", 2), ("b", 3))
    # The basis is what each funded, not what each has left.
    assert split_pro_rata([Source("a", 100, 1), Source("b", 100, 100)], 10) == (
        ("a", 5),
        ("b", 5),
    )


@given(
    funded=st.lists(st.integers(0, 10**9), min_size=1, max_size=5),
    amount=st.integers(1, 10**9),
)
def test_pro_rata_always_adds_up_and_no_part_is_a_fen_away_from_its_exact_share(
    funded: list[int], amount: int
) -> None:
    payers = [Source(f"s{i}", f, f) for i, f in enumerate(funded)]
    split = split_pro_rata(payers, amount)
    total = sum(funded)
    if total == 0:
        assert split == ()
        return
    check_source_parts("split", amount, split)
    for name, fen in split:
        exact = amount * dict((s.source, s.funded) for s in payers)[name] / total
        assert abs(fen - exact) < 1


def test_a_source_that_cannot_pay_its_pro_rata_part_refuses_the_order() -> None:
    pool = sources(("district", 100_000, 10_000), ("platform-matching", 100_000, 100_000))
    with pytest.raises(ResourceExhausted) as err:
        domain.split(pool, 45_000, PRO_RATA)
    assert (err.value.reason, err.value.field) == ("SOURCE_EXHAUSTED", "pool_id")
    assert err.value.metadata["source"] == "district"
    assert domain.split(pool, 20_000, PRO_RATA) == (
        ("district", 10_000),
        ("platform-matching", 10_000),
    )


def test_priority_pays_from_the_first_source_then_spills_over_to_the_next() -> None:
    pool = sources(("district", 100_000, 30_000), ("platform-matching", 50_000, 50_000))
    first = FundingRules(split=Split.PRIORITY)  # no list: the order sources first funded
    assert domain.split(pool, 20_000, first) == (("district", 20_000),)
    assert domain.split(pool, 45_000, first) == (
        ("district", 30_000),
        ("platform-matching", 15_000),
    )
    platform_first = FundingRules(split=Split.PRIORITY, priority=("platform-matching",))
    assert domain.split(pool, 60_000, platform_first) == (
        ("district", 10_000),
        ("platform-matching", 50_000),
    )
    with pytest.raises(ResourceExhausted) as err:  # the pool itself cannot pay: not a source
        domain.check_funds(pool, POOL, "tv", 80_001, first)
    assert err.value.reason == "BUDGET_EXHAUSTED"


def test_the_priority_list_decides_before_the_order_of_funding() -> None:
    payers = [Source(n, 10, 10) for n in ("a", "b", "c")]
    assert split_priority(payers, 25, ("c", "a")) == (("a", 10), ("b", 5), ("c", 10))


def test_a_pool_whose_fundings_named_no_source_records_no_parts_as_before() -> None:
    pool = Pool(POOL, funded=100_000, available=100_000)
    assert domain.split(pool, 45_000, PRO_RATA) == ()
    [held] = domain.reserve(pool, ev.SubsidyReserved(order_id="o", pool_id=POOL, subsidy_fen=1))
    assert parts(held) == ()


# --------------------------------------------------------------------------------------------
# The fold: parts move per source; events without them fold as before


def test_a_refund_credits_back_the_sources_that_paid() -> None:
    pool = Pool(POOL)
    for source, fen in (("district", 1_000_000), ("platform-matching", 250_000)):
        pool = budget.apply(pool, ev.BudgetFunded(pool_id=POOL, amount_fen=fen, source=source))
    [held] = domain.reserve(
        pool, ev.SubsidyReserved(order_id="o-1", pool_id=POOL, subsidy_fen=45_000), PRO_RATA
    )
    pool = budget.apply(pool, held)
    res = domain.evolve(None, held)
    assert res is not None and res.sources == (("district", 36_000), ("platform-matching", 9_000))
    [captured] = domain.capture(res, "pay-1")
    pool = budget.apply(pool, captured)
    assert [(s.source, s.spent) for s in pool.sources] == [
        ("district", 36_000),
        ("platform-matching", 9_000),
    ]
    res = domain.evolve(res, captured)
    [refunded] = domain.release(res, "REFUNDED")
    pool = budget.apply(pool, refunded)
    assert [(s.source, s.available, s.spent) for s in pool.sources] == [
        ("district", 1_000_000, 0),
        ("platform-matching", 250_000, 0),
    ]


def test_events_written_before_sources_fold_as_before_and_by_what_their_reserve_held() -> None:
    """Legacy orders (no parts): their reserve is attributed by priority in funding order, and
    their capture or release moves what that reserve attributed, so a later order with parts
    still finds its own money (an attribution by the bucket's current holders would not)."""
    log: list[Message] = [
        ev.BudgetFunded(pool_id=POOL, amount_fen=100, source="a"),
        ev.BudgetFunded(pool_id=POOL, amount_fen=1_000, source="b"),
        ev.SubsidyReserved(order_id="l1", pool_id=POOL, subsidy_fen=100),  # all of a
        ev.SubsidyReserved(order_id="l2", pool_id=POOL, subsidy_fen=100),  # b
        ev.SubsidyReleased(order_id="l2", pool_id=POOL, subsidy_fen=100, reason="CANCELLED"),
        ev.BudgetFunded(pool_id=POOL, amount_fen=100, source="a"),
        ev.SubsidyReserved(
            order_id="n1",
            pool_id=POOL,
            subsidy_fen=50,
            sources=[common_pb2.SourceAmount(source="a", fen=50)],
        ),
        ev.SubsidyCaptured(order_id="l1", pool_id=POOL, subsidy_fen=100),
        ev.SubsidyCaptured(
            order_id="n1",
            pool_id=POOL,
            subsidy_fen=50,
            sources=[common_pb2.SourceAmount(source="a", fen=50)],
        ),
    ]
    pool = budget.fold(POOL, log)
    assert (pool.funded, pool.available, pool.reserved, pool.spent) == (1_200, 1_050, 0, 150)
    assert [(s.source, s.available, s.spent) for s in pool.sources] == [
        ("a", 50, 150),
        ("b", 1_000, 0),
    ]


def test_parts_that_do_not_add_up_or_name_a_stranger_are_caught_by_the_fold() -> None:
    pool = budget.apply(Pool(POOL), ev.BudgetFunded(pool_id=POOL, amount_fen=100, source="a"))
    short = ev.SubsidyReserved(
        order_id="o",
        pool_id=POOL,
        subsidy_fen=50,
        sources=[common_pb2.SourceAmount(source="a", fen=40)],
    )
    with pytest.raises(InvariantViolation, match="do not add up"):
        budget.apply(pool, short)
    stranger = ev.SubsidyReserved(
        order_id="o",
        pool_id=POOL,
        subsidy_fen=50,
        sources=[common_pb2.SourceAmount(source="x", fen=50)],
    )
    with pytest.raises(InvariantViolation, match="never funded"):
        budget.apply(pool, stranger)
    overdraw = ev.SubsidyReserved(
        order_id="o",
        pool_id=POOL,
        subsidy_fen=101,
        sources=[common_pb2.SourceAmount(source="a", fen=101)],
    )
    with pytest.raises(InvariantViolation, match="negative"):
        budget.apply(pool, overdraw)


# --------------------------------------------------------------------------------------------
# Tranches

SCHEDULE = (Tranche(100_000, T0), Tranche(200_000, T0 + dt.timedelta(days=30)))


def test_a_funding_in_tranches_is_scheduled_and_each_tranche_is_available_from_its_time() -> None:
    cmd = domain.Fund(POOL, 300_000, "district", "fp-1", SCHEDULE)
    before = T0 - dt.timedelta(seconds=1)
    events = domain.fund_once(domain.Funding(None), cmd, before)
    assert [type(e).__name__ for e in events] == ["BudgetFunded"]
    pool = budget.fold(POOL, events)
    assert (pool.funded, pool.available, pool.scheduled) == (0, 0, 300_000)
    pending = domain.scheduled(events[0])  # type: ignore[arg-type]
    assert domain.release_due(pending, before) == []
    [first] = domain.release_due(pending, T0)
    assert isinstance(first, ev.TrancheReleased) and (first.amount_fen, first.index) == (100_000, 0)
    pool = budget.apply(pool, first)
    assert (pool.funded, pool.available, pool.scheduled) == (100_000, 100_000, 200_000)
    later = domain.release_due(pending[1:], T0 + dt.timedelta(days=31))
    pool = budget.apply(pool, later[0])
    assert (pool.funded, pool.available, pool.scheduled) == (300_000, 300_000, 0)
    assert pool.sources == (Source("district", 300_000, 300_000),)


def test_tranches_already_due_at_approval_are_released_with_it() -> None:
    cmd = domain.Fund(POOL, 300_000, "district", "fp-1", SCHEDULE)
    events = domain.fund_once(domain.Funding(None), cmd, T0 + dt.timedelta(hours=1))
    assert [type(e).__name__ for e in events] == ["BudgetFunded", "TrancheReleased"]
    pool = budget.fold(POOL, events)
    assert (pool.funded, pool.scheduled) == (100_000, 200_000)


def test_a_schedule_must_add_up_to_the_funding_and_stay_within_the_ceiling() -> None:
    for schedule in (
        (Tranche(100_000, T0),),  # short of the amount
        (Tranche(0, T0), Tranche(300_000, T0)),  # an empty instalment
        tuple(Tranche(1, T0) for _ in range(domain.MAX_TRANCHES + 1)),
    ):
        with pytest.raises(InvalidArgument) as err:
            domain.fund(Pool(POOL), 300_000, "district", schedule)
        assert (err.value.reason, err.value.field) == ("INVALID_TRANCHES", "tranches")
    scheduled_pool = Pool(POOL, scheduled=900)
    with pytest.raises(FailedPrecondition) as ceiling:  # scheduled money counts
        domain.check_ceiling(scheduled_pool, POOL, 101, 1_000)
    assert ceiling.value.reason == "FUNDING_CEILING"
    domain.check_ceiling(scheduled_pool, POOL, 100, 1_000)


# --------------------------------------------------------------------------------------------
# Sources a funding may name

PROPOSE = domain.ProposeFunding("fp-k", POOL, 1_000, "district", "k", 10**12)


def test_a_funding_names_one_of_the_campaigns_sources() -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.propose_funding(None, None, replace(PROPOSE, source="lottery"), PRO_RATA)
    assert (err.value.reason, err.value.field) == ("UNKNOWN_SOURCE", "source")
    [proposed] = domain.propose_funding(None, None, PROPOSE, PRO_RATA)
    assert isinstance(proposed, ev.FundingProposed) and proposed.source == "district"
    # A policy that declares no sources (every version before funding rules) accepts any.
    assert domain.propose_funding(None, None, replace(PROPOSE, source="lottery"))


def test_the_same_key_for_another_source_or_schedule_is_another_funding() -> None:
    [proposed] = domain.propose_funding(None, None, PROPOSE, PRO_RATA)
    existing = domain.evolve_proposal(None, proposed, "li")
    assert domain.propose_funding(existing, None, PROPOSE, PRO_RATA) == []
    for other in (
        replace(PROPOSE, source="platform-matching"),
        replace(PROPOSE, tranches=(Tranche(1_000, T0),)),
    ):
        with pytest.raises(AlreadyExists) as err:
            domain.propose_funding(existing, None, other, PRO_RATA)
        assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"


# --------------------------------------------------------------------------------------------
# Sub-budgets

CAPPED = FundingRules(split=Split.PRIORITY, sub_budgets=(("projector", 1_000),))


def test_a_category_with_a_sub_budget_takes_at_most_its_share_of_the_pools_funded_amount() -> None:
    pool = sources(("district", 1_000_000, 1_000_000))  # projector: at most 100,000 fen
    used = CategoryUse("projector", reserved=30_000, spent=10_000)
    assert domain.check_funds(pool, POOL, "projector", 60_000, CAPPED, used)
    with pytest.raises(ResourceExhausted) as err:
        domain.check_funds(pool, POOL, "projector", 60_001, CAPPED, used)
    assert (err.value.reason, err.value.field) == ("SUB_BUDGET_EXHAUSTED", "pool_id")
    assert (err.value.metadata["category"], err.value.metadata["pool_id"]) == ("projector", POOL)
    # Other categories are not capped by it.
    assert domain.check_funds(pool, POOL, "tv", 900_000, CAPPED, CategoryUse("tv"))


def test_a_release_gives_the_sub_budget_back() -> None:
    use = CategoryUse("projector", reserved=60_000)
    cancelled = ev.SubsidyReleased(order_id="o", subsidy_fen=60_000, reason="CANCELLED")
    assert domain.evolve_use(use, cancelled) == CategoryUse("projector")
    paid = domain.evolve_use(use, ev.SubsidyCaptured(order_id="o", subsidy_fen=60_000))
    assert paid == CategoryUse("projector", spent=60_000)
    refunded = ev.SubsidyReleased(
        order_id="o", subsidy_fen=60_000, reason="REFUNDED", was_captured=True
    )
    assert domain.evolve_use(paid, refunded) == CategoryUse("projector")


# --------------------------------------------------------------------------------------------
# Thresholds

WATCHED = FundingRules(alert_thresholds_bp=(5_000, 8_000, 9_500), sub_budgets=(("tv", 5_000),))


def settle(
    spent: int, category_spent: int, alerted: frozenset[tuple[str, int]] = frozenset()
) -> Settle:
    res = domain.Reservation("o-9", POOL, 10_000, PENDING, "q", (("district", 10_000),), "tv")
    pool = replace(sources(("district", 100_000, 100_000 - spent)), reserved=0)
    return Settle(res, pool, CategoryUse("tv", spent=category_spent), alerted)


def alerts(events: list[Message]) -> list[tuple[str, int]]:
    return [
        (e.category, e.threshold_bp) for e in events if isinstance(e, ev.BudgetThresholdReached)
    ]


def test_a_capture_that_reaches_a_threshold_raises_its_alert() -> None:
    # The pool: 40 % spent + 10 % = 50 %. tv: of its sub-budget of 50,000: 0 + 10,000 = 20 %.
    events = domain.capture_and_alert(settle(40_000, 0), "pay-1", WATCHED)
    assert isinstance(events[0], ev.SubsidyCaptured)
    assert alerts(events) == [("", 5_000)]
    [alert] = events[1:]
    assert isinstance(alert, ev.BudgetThresholdReached)
    assert (alert.spent_fen, alert.base_fen, alert.order_id) == (50_000, 100_000, "o-9")


def test_a_capture_reaching_several_thresholds_raises_each_and_a_category_its_own() -> None:
    # The pool: 75 % + 10 % = 85 %; tv: 30,000 + 10,000 of 50,000 = 80 %.
    events = domain.capture_and_alert(settle(75_000, 30_000), "pay-1", WATCHED)
    assert alerts(events) == [("", 5_000), ("", 8_000), ("tv", 5_000), ("tv", 8_000)]


def test_a_threshold_is_never_raised_twice() -> None:
    raised = frozenset({("", 5_000), ("", 8_000), ("tv", 5_000)})
    events = domain.capture_and_alert(settle(75_000, 30_000, raised), "pay-1", WATCHED)
    assert alerts(events) == [("tv", 8_000)]
    # Below a threshold (after refunds), and back above it: still once.
    assert alerts(domain.capture_and_alert(settle(40_000, 0, raised), "pay-1", WATCHED)) == []


def test_without_thresholds_or_with_a_repeat_capture_no_alert() -> None:
    assert alerts(domain.capture_and_alert(settle(99_000, 0), "pay-1", FundingRules())) == []
    done = settle(99_000, 0)
    assert done.reservation is not None
    repeat = replace(done, reservation=replace(done.reservation, status=CAPTURED))
    assert domain.capture_and_alert(repeat, "pay-1", WATCHED) == []
