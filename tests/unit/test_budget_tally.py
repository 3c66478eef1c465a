"""The budget fold in place (``budget.Tally``, what ``budget.fold`` and the auditor's replay use)
against the frozen fold (``budget.step``): after any sequence of ledger events, right or wrong,
the same figures, the same parts moved, and the same violation at the same event."""

from __future__ import annotations

from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.invariants import InvariantViolation
from services.kernel.contract import budget
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

NAMES = ("", "district", "platform", "nobody")
ORDERS = ("o1", "o2", "o3")
fen = st.one_of(st.integers(1, 50_000), st.integers(-3, 0))
parts = st.lists(st.tuples(st.sampled_from(NAMES), fen), max_size=3).map(
    lambda ps: [common_pb2.SourceAmount(source=s, fen=f) for s, f in ps]
)


def _moving(kind: type[Message]) -> st.SearchStrategy[Message]:
    extra = {"was_captured": st.booleans()} if kind is ev.SubsidyReleased else {}
    return st.builds(
        kind, order_id=st.sampled_from(ORDERS), subsidy_fen=fen, sources=parts, **extra
    )


events = st.one_of(
    st.builds(
        ev.BudgetFunded,
        source=st.sampled_from(NAMES),
        amount_fen=st.one_of(st.integers(1, 200_000), st.integers(-3, 0)),
        tranches=st.lists(st.builds(common_pb2.Tranche, amount_fen=st.integers(0, 9)), max_size=1),
    ),
    st.builds(ev.TrancheReleased, source=st.sampled_from(NAMES), amount_fen=fen),
    _moving(ev.SubsidyReserved),
    _moving(ev.SubsidyCaptured),
    _moving(ev.SubsidyReleased),
    st.just(ev.PoolAssigned(pool_id="p")),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(events, max_size=25), st.lists(st.sampled_from(ORDERS), max_size=3))
def test_the_tally_folds_exactly_as_step_does(log: list[Message], forget: list[str]) -> None:
    frozen, tally = budget.Pool("p"), budget.Tally("p")
    held: dict[str, budget.Parts] = {}
    for event in log:
        order_id = getattr(event, "order_id", "")
        memory = held.get(order_id) if order_id not in forget else None
        try:
            frozen, expected = budget.step(frozen, event, memory)
        except InvariantViolation as exc:
            try:
                tally.step(event, memory)
            except InvariantViolation as mine:
                assert str(mine) == str(exc)
            else:
                raise AssertionError(f"the tally took {event} that step refuses: {exc}")
            assert tally.pool() == frozen  # unchanged by the refused event
            continue
        assert tally.step(event, memory) == expected
        assert tally.pool() == frozen
        if isinstance(event, ev.SubsidyReserved) and not event.sources:
            held[order_id] = expected


def test_a_refused_funding_of_a_new_source_leaves_no_trace_of_it() -> None:
    tally = budget.Tally("p")
    tally.step(ev.BudgetFunded(source="district", amount_fen=100))
    try:
        tally.step(ev.BudgetFunded(source="platform", amount_fen=-5))
    except InvariantViolation as exc:
        assert "negative" in str(exc)
    else:
        raise AssertionError("a negative funding was folded")
    assert tally.pool() == budget.Pool(
        "p", 100, 100, sources=(budget.Source("district", 100, 100),)
    )
