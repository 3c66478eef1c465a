"""A budget pool split into shards (services/ledger/domain.py: shard_of, spread, rebalance,
shard_pool; the budget fold's ShardBudgetSent / ShardBudgetReceived), against a plain model.

Hypothesis drives funding (two sources), reservations routed to a shard by their order id,
captures, releases and changes of the shard count. A reservation is decided as the ledger's
reserve decides it: on its shard, and when that shard is short, again after a rebalance with
every shard within reach. After every step each shard is a balanced pool on its own (nothing
negative: no shard overspends what it was given), the pool is exactly the sum of its shards,
the money is what the model says, a reservation is refused only when the whole pool cannot pay
it, and each shard's stream folds (as the auditor folds it) to the shard's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.audit.totals import Rebuild, pool_table
from services.invariants import InvariantViolation, check_shards_add_up
from services.kernel.contract import budget, fundledger
from services.kernel.contract.budget import Pool, shard_stream, stream_shard
from services.kernel.errors import DomainError, InvalidArgument, ResourceExhausted
from services.kernel.events import Context, new_envelope, service_actor
from services.ledger import domain
from services.ledger.domain import CAPTURED, PENDING
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

POOL = "hot"
LEDGER = Context(service_actor("ledger"))
SOURCES = ("district", "platform")


def figures_of(p: Pool) -> dict[str, int]:
    return {b: getattr(p, b) for b in ("funded", "available", "reserved", "spent")}


@dataclass
class Sharded:
    """A pool as the shard decisions leave it: each shard's figures and stream."""

    shards: int = 1
    figures: dict[int, Pool] = field(default_factory=lambda: {0: Pool(POOL)})
    streams: dict[int, list[Message]] = field(default_factory=dict)
    reservations: dict[str, tuple[int, domain.Reservation]] = field(default_factory=dict)
    funded: int = 0
    refused: int = 0
    # Every event in the order appended: (shard, event, its version in the shard's stream).
    log: list[tuple[int, Message, int]] = field(default_factory=list)

    def append(self, plan: domain.Plan) -> None:
        for shard in sorted(plan):
            for event in plan[shard]:
                before = self.figures.get(shard, Pool(POOL))
                self.figures[shard] = budget.apply(before, event)
                self.streams.setdefault(shard, []).append(event)
                self.log.append((shard, event, len(self.streams[shard])))

    def total(self) -> Pool:
        return budget.total(POOL, (self.figures[k] for k in sorted(self.figures)))

    def fund(self, amount: int, source: str) -> None:
        self.append({0: domain.fund(self.figures[0], amount, source)})
        self.funded += amount

    def reserve(self, order: str, amount: int) -> bool:
        """As the ledger's reserve: the routed shard, then (short) every shard after a
        rebalance; True when held."""
        shard = domain.shard_of(order, self.shards)
        whole = self.total().available
        request = ev.SubsidyReserved(order_id=order, pool_id=POOL, subsidy_fen=amount)
        try:
            held = domain.reserve(self.figures.get(shard, Pool(POOL)), request)
        except ResourceExhausted as short:
            assert short.reason == "BUDGET_EXHAUSTED"
            self.append(domain.rebalance(POOL, self.figures, self.shards, shard, amount))
            try:
                held = domain.reserve(self.figures.get(shard, Pool(POOL)), request)
            except ResourceExhausted as err:
                # Refused only when the whole pool could not pay it.
                assert (err.reason, amount > whole) == ("BUDGET_EXHAUSTED", True)
                self.refused += 1
                return False
        assert amount <= whole
        self.append({shard: held})
        assert isinstance(held[0], ev.SubsidyReserved)
        res = domain.evolve(None, held[0])
        assert res is not None
        self.reservations[order] = (shard, res)
        return True

    def settle(self, order: str, decide: str) -> None:
        shard, res = self.reservations[order]
        try:
            events = (
                domain.capture(res, "pay") if decide == "capture" else domain.release(res, decide)
            )
        except DomainError:  # each refusal is the single-pool tests' (test_ledger_domain)
            return
        self.append({shard: events})
        after = res
        for e in events:
            after = domain.evolve(after, e) or after
        self.reservations[order] = (shard, after)

    def reshard(self, shards: int) -> None:
        plan = domain.shard_pool(POOL, self.figures, self.shards, shards)
        self.append(plan)
        if plan:
            self.shards = shards

    def check(self) -> None:
        for k, p in self.figures.items():
            p.check()  # balanced, nothing negative, sources adding up
            assert budget.fold(POOL, self.streams.get(k, [])) == p or not self.streams.get(k)
        total = self.total()
        check_shards_add_up(
            POOL, figures_of(total), {k: figures_of(p) for k, p in self.figures.items()}
        )
        held = [r for _, r in self.reservations.values()]
        assert total.funded == self.funded
        assert total.reserved == sum(r.subsidy_fen for r in held if r.status == PENDING)
        assert total.spent == sum(r.subsidy_fen for r in held if r.status == CAPTURED)
        assert total.available == self.funded - total.reserved - total.spent >= 0


commands = st.lists(
    st.one_of(
        st.tuples(st.just("fund"), st.integers(1, 10**6), st.sampled_from(SOURCES)),
        st.tuples(st.just("reserve"), st.integers(1, 3 * 10**5)),
        st.tuples(st.just("reserve"), st.integers(1, 3 * 10**5)),
        st.tuples(st.just("reserve"), st.integers(1, 3 * 10**5)),
        st.tuples(st.just("settle"), st.integers(0, 1000), st.sampled_from(("capture",))),
        st.tuples(
            st.just("settle"), st.integers(0, 1000), st.sampled_from(("CANCELLED", "REFUNDED"))
        ),
        st.tuples(st.just("reshard"), st.integers(1, 8)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(first=st.integers(1, 8), steps=commands)
def test_any_sequence_on_a_sharded_pool_balances_every_shard_and_never_overspends(
    first: int, steps: list[tuple[object, ...]]
) -> None:
    m = Sharded()
    m.fund(10**6, "district")
    m.reshard(first)
    m.check()
    for command in steps:
        match command:
            case ("fund", int(amount), str(source)):
                m.fund(amount, source)
            case ("reserve", int(amount)):
                m.reserve(f"o-{len(m.reservations)}-{m.refused}", amount)
            case ("settle", int(pick), str(decide)):
                if m.reservations:
                    m.settle(sorted(m.reservations)[pick % len(m.reservations)], decide)
            case ("reshard", int(shards)):
                m.reshard(shards)
            case _:
                raise AssertionError(command)
        m.check()
    # The auditor, from the shards' streams alone, rebuilds the pool's figures.
    r = Rebuild()
    for shard, events in m.streams.items():
        for version, event in enumerate(events, 1):
            r.add(new_envelope("ledger", shard_stream(POOL, shard), event, LEDGER, version=version))
    assert r.finish()["pool"].table() == pool_table([m.total()])


@settings(max_examples=100, deadline=None)
@given(shards=st.integers(1, 16), n=st.integers(1, 60), fen=st.integers(1, 10**4))
def test_a_pool_funded_for_exactly_n_holds_exactly_n_whatever_its_shards(
    shards: int, n: int, fen: int
) -> None:
    """A budget of exactly n subsidies on a pool of any shard count: the first n orders are
    held (however they hash over the shards), every later one is refused, nothing is left."""
    m = Sharded()
    m.fund(n * fen, "district")
    m.reshard(shards)
    outcomes = [m.reserve(f"order-{i}", fen) for i in range(n + 5)]
    assert outcomes == [True] * n + [False] * 5
    m.check()
    assert (m.total().available, m.total().reserved) == (0, n * fen)


def test_an_order_goes_to_one_shard_by_its_id_and_a_pool_of_one_shard_is_shard_0() -> None:
    assert {domain.shard_of(f"o-{i}", 1) for i in range(100)} == {0}
    spread_over = {domain.shard_of(f"o-{i}", 4) for i in range(100)}
    assert spread_over == {0, 1, 2, 3}
    assert domain.shard_of("o-7", 4) == domain.shard_of("o-7", 4)
    assert (shard_stream(POOL, 0), shard_stream(POOL, 3)) == (
        "budget-pool/hot",
        "budget-pool/hot/3",
    )
    assert stream_shard("budget-pool/hot/3") == ("hot", 3)
    assert stream_shard("budget-pool/hot") == ("hot", 0)


def test_sharding_spreads_the_available_budget_and_lowering_the_count_gives_it_back() -> None:
    m = Sharded()
    m.fund(1001, "district")
    m.reshard(4)
    assert [m.figures[k].available for k in range(4)] == [251, 250, 250, 250]
    assert isinstance(m.streams[0][1], ev.PoolSharded)
    m.reserve("a", 200)  # on one shard
    m.reshard(2)
    m.check()
    assert {k for k, p in m.figures.items() if p.available} <= {0, 1}
    assert sum(p.available for p in m.figures.values()) == 801
    assert domain.shard_pool(POOL, m.figures, 2, 2) == {}  # the same count: nothing
    with pytest.raises(InvalidArgument) as err:
        domain.shard_pool(POOL, m.figures, 2, domain.MAX_SHARDS + 1)
    assert (err.value.reason, err.value.field) == ("INVALID_SHARDS", "shards")


def test_a_short_shard_takes_at_least_what_it_needs_and_nothing_when_the_pool_cannot_pay() -> None:
    m = Sharded()
    m.fund(400, "district")
    m.fund(400, "platform")
    m.reshard(4)  # 200 each, both sources in each
    plan = domain.rebalance(POOL, m.figures, 4, 2, 500)
    m.append(plan)
    assert m.figures[2].available >= 500
    m.check()
    assert domain.rebalance(POOL, m.figures, 4, 2, 801) == {}  # the pool has 800
    assert domain.rebalance(POOL, m.figures, 4, 2, 10) == {}  # it can pay


def test_a_shard_cannot_send_more_than_it_has_nor_a_source_it_never_had() -> None:
    shard = budget.apply(
        Pool(POOL),
        ev.ShardBudgetReceived(
            pool_id=POOL,
            from_shard=0,
            to_shard=1,
            amount_fen=100,
            sources=[common_pb2.SourceAmount(source="district", fen=100)],
        ),
    )
    assert (shard.funded, shard.available) == (100, 100)
    for sources in (
        [common_pb2.SourceAmount(source="district", fen=101)],
        [common_pb2.SourceAmount(source="platform", fen=10)],
    ):
        sent = ev.ShardBudgetSent(
            pool_id=POOL, from_shard=1, to_shard=0, amount_fen=sources[0].fen, sources=sources
        )
        with pytest.raises(InvariantViolation):
            budget.apply(shard, sent)
        tally = budget.Tally(POOL)
        tally.step(
            ev.ShardBudgetReceived(
                pool_id=POOL,
                to_shard=1,
                amount_fen=100,
                sources=[common_pb2.SourceAmount(source="district", fen=100)],
            )
        )
        with pytest.raises(InvariantViolation):
            tally.step(sent)
        assert tally.pool() == replace(shard)  # left as it was


def test_the_auditor_names_money_sent_between_shards_that_never_arrived() -> None:
    district = [common_pb2.SourceAmount(source="district", fen=40)]
    r = Rebuild()
    main = shard_stream(POOL, 0)
    r.add(
        new_envelope(
            "ledger",
            main,
            ev.BudgetFunded(pool_id=POOL, amount_fen=100, source="district"),
            LEDGER,
            version=1,
        )
    )
    r.add(
        new_envelope(
            "ledger",
            main,
            ev.ShardBudgetSent(
                pool_id=POOL, from_shard=0, to_shard=1, amount_fen=40, sources=district
            ),
            LEDGER,
            version=2,
        )
    )
    folds = r.finish()
    # Shard 0 alone balances (60 available of 60 funded), but 40 fen vanished on the way.
    with pytest.raises(InvariantViolation, match="sent shard 1 40 fen"):
        folds["pool"].table()


@settings(max_examples=150, deadline=None)
@given(first=st.integers(1, 8), steps=commands)
def test_the_fund_ledger_shows_a_sharded_pool_as_one_pool_with_its_whole_balances(
    first: int, steps: list[tuple[object, ...]]
) -> None:
    """The fund-detail ledger over a sharded pool's streams (fundledger.movements, which the
    daily report sums): every row names the pool, never a shard; after every row each source's
    balances are the whole pool's (balanced, nothing negative); the last row of each source
    shows the pool's figures as the shards add up to; and the rows do not depend on the order
    the events were read in."""
    m = Sharded()
    m.fund(10**6, "district")
    m.reshard(first)
    for command in steps:
        match command:
            case ("fund", int(amount), str(source)):
                m.fund(amount, source)
            case ("reserve", int(amount)):
                m.reserve(f"o-{len(m.reservations)}-{m.refused}", amount)
            case ("settle", int(pick), str(decide)):
                if m.reservations:
                    m.settle(sorted(m.reservations)[pick % len(m.reservations)], decide)
            case ("reshard", int(shards)):
                m.reshard(shards)
    # The events as the ledger wrote them, each stamped in the order it was appended.
    envelopes = []
    for n, (shard, event, version) in enumerate(m.log):
        env = new_envelope("ledger", shard_stream(POOL, shard), event, LEDGER, version=version)
        env.occurred_at.FromSeconds(1_750_000_000 + n)
        envelopes.append(env)
    rows = fundledger.movements(envelopes)
    assert {r.pool_id for r in rows} == {POOL}
    for r in rows:
        assert r.funded_fen == r.available_fen + r.reserved_fen + r.spent_fen, r
        assert min(r.available_fen, r.reserved_fen, r.spent_fen) >= 0, r
    total = m.total()
    last = {r.source: r for r in rows}
    for held in total.sources:
        shown = last[held.source]
        assert (shown.funded_fen, shown.available_fen, shown.reserved_fen, shown.spent_fen) == (
            held.funded,
            held.available,
            held.reserved,
            held.spent,
        )
    assert fundledger.movements(list(reversed(envelopes))) == rows
