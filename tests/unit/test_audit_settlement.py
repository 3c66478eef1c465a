"""The auditor's settlement and returns ledger, rebuilt from the ledger's events alone
(:class:`services.audit.totals.SettlementFold`): the batches and refunds it lists, the
settlement promises it checks, and its agreement with the ledger's own ``settled`` over random
sequences of the settlement state machine."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf.message import Message
from hypothesis import settings
from hypothesis.stateful import invariant

from services.audit.totals import Rebuild, ReturnsFold, SettlementFold, settlement_and_returns
from services.invariants import InvariantViolation, MerchantSettled
from services.kernel.events import Context, Envelope, new_envelope, payload_of, service_actor
from services.ledger import settlement_domain as sd
from subsidy.v1 import events_pb2 as ev
from tests.unit.test_settlement_property import Ledger

LEDGER = Context(service_actor("ledger"))
T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


class Streams:
    """Envelopes of the ledger's streams, each stream's versions counted."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def __call__(self, stream: str, event: Message) -> Envelope:
        self.versions[stream] = self.versions.get(stream, 0) + 1
        return new_envelope("ledger", stream, event, LEDGER, version=self.versions[stream])


def folded(envs: list[Envelope]) -> tuple[SettlementFold, ReturnsFold]:
    settlement, returns = settlement_and_returns()
    rebuild = Rebuild([settlement, returns])
    for e in envs:
        rebuild.add(e)
    rebuild.finish()
    assert isinstance(settlement, SettlementFold) and isinstance(returns, ReturnsFold)
    return settlement, returns


def created(batch: str, lines: dict[str, int], claws: dict[str, int]) -> ev.SettlementBatchCreated:
    gross, clawed = sum(lines.values()), sum(claws.values())
    e = ev.SettlementBatchCreated(
        batch_id=batch,
        merchant_id="m-1",
        lines=[ev.SettlementLine(order_id=o, subsidy_fen=f) for o, f in lines.items()],
        clawbacks=[ev.ClawbackLine(order_id=o, fen=f) for o, f in claws.items()],
        gross_fen=gross,
        clawback_fen=clawed,
        net_fen=gross - clawed,
    )
    e.period_from.FromDatetime(T0)
    e.period_to.FromDatetime(T0 + dt.timedelta(days=1))
    return e


def campaign() -> list[Envelope]:
    """Three orders of m-1; b1 pays o1 and o2 and is paid; o2 is refunded and clawed back; b2
    pays o3 less that clawback and is only created."""
    s = Streams()
    pool, merchant = "budget-pool/p", "settlement/m-1"
    out = [s(pool, ev.BudgetFunded(pool_id="p", amount_fen=10**6))]
    for o in ("o1", "o2", "o3"):
        out += [
            s(pool, ev.SubsidyReserved(
                order_id=o, pool_id="p", platform_id="jd", merchant_id="m-1", sku="s-1",
                category="phone", unit_price_fen=300_000, subsidy_fen=45_000,
            )),
            s(pool, ev.SubsidyCaptured(order_id=o, pool_id="p", subsidy_fen=45_000)),
        ]  # fmt: skip
    out += [
        s(merchant, created("b1", {"o1": 45_000, "o2": 45_000}, {})),
        s(merchant, ev.SettlementBatchApproved(batch_id="b1", merchant_id="m-1", net_fen=90_000)),
        s(merchant, ev.SettlementBatchPaid(batch_id="b1", merchant_id="m-1", net_fen=90_000)),
        s(pool, ev.SubsidyReleased(
            order_id="o2", pool_id="p", subsidy_fen=45_000, reason="REFUNDED", was_captured=True
        )),
        s(merchant, ev.ClawbackRecorded(
            order_id="o2", merchant_id="m-1", fen=45_000, batch_id="b1"
        )),
        s(merchant, created("b2", {"o3": 45_000}, {"o2": 45_000})),
    ]  # fmt: skip
    return out


def test_batches_and_returns_are_what_the_events_say() -> None:
    settlement, returns = folded(campaign())
    day = ("2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z")
    assert settlement.table() == {
        ("b1", "m-1", *day): {
            "orders": 2, "gross_fen": 90_000, "clawbacks": 0, "clawback_fen": 0,
            "net_fen": 90_000, "approved": 1, "paid": 1,
        },
        ("b1", "order", "o1"): {"subsidy_fen": 45_000},
        ("b1", "order", "o2"): {"subsidy_fen": 45_000},
        ("b2", "m-1", *day): {
            "orders": 1, "gross_fen": 45_000, "clawbacks": 1, "clawback_fen": 45_000,
            "net_fen": 0, "approved": 0, "paid": 0,
        },
        ("b2", "order", "o3"): {"subsidy_fen": 45_000},
        ("b2", "clawback", "o2"): {"fen": 45_000},
    }  # fmt: skip
    assert returns.table() == {
        ("o2", "m-1", "jd", "s-1", "b1", "b2"): {"subsidy_fen": 45_000, "clawed_back": 1}
    }
    # The same figures as the ledger's own reading of its events.
    assert settlement.merchants() == sd.settled(payload_of(e) for e in campaign())
    assert settlement.merchants() == {"m-1": MerchantSettled(90_000, 45_000, 45_000, 0)}


def broken(change: str) -> list[Envelope]:
    """The campaign with one settlement promise broken."""
    envs = campaign()
    s = Streams()
    for e in envs:  # carry on each stream's versions
        s.versions[e.stream_id] = max(s.versions.get(e.stream_id, 0), e.stream_version)
    if change == "two batches":
        return [*envs, s("settlement/m-1", created("b3", {"o1": 45_000}, {}))]
    if change == "no clawback":  # nor the batch that deducted it (the last of its stream)
        return [e for e in envs if e.event_type != ev.ClawbackRecorded.DESCRIPTOR.full_name][:-1]
    if change == "deducted twice":
        return [*envs, s("settlement/m-1", created("b3", {}, {"o2": 45_000}))]
    if change == "paid more":  # b1 paid 1 fen more than its lines
        bad = created("b1", {"o1": 45_000, "o2": 45_000}, {})
        bad.net_fen += 1
        return [
            new_envelope("ledger", e.stream_id, bad, LEDGER, version=e.stream_version)
            if e.event_type == ev.SettlementBatchCreated.DESCRIPTOR.full_name and b"b1" in e.payload
            else e
            for e in envs
        ]
    raise AssertionError(change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("two batches", "order o1 in two batches"),
        ("no clawback", "refunds of batched orders without a clawback: ['o2']"),
        ("deducted twice", "clawback of o2 deducted wrongly"),
        ("paid more", "merchant m-1: paid 90001 fen != unrefunded 45000 + clawed back 45000"),
    ],
)
def test_a_broken_settlement_promise_is_a_violation(change: str, message: str) -> None:
    settlement, returns = folded(broken(change))
    with pytest.raises(InvariantViolation) as err:
        settlement.table()
    assert str(err.value).startswith(message)
    with pytest.raises(InvariantViolation):
        returns.table()


class AuditorAgrees(Ledger):
    """The settlement state machine, with the auditor's fold of its events beside it."""

    @invariant()
    def the_auditor_adds_up_what_the_ledger_does(self) -> None:
        fold = SettlementFold()
        env = Envelope(service="ledger")
        for event in self.log:  # the machine's events, in the order it decided them
            fold.add(env, event)
        fold.check()
        assert fold.merchants() == sd.settled(self.log)
        for batch_id, batch in self.batches.items():
            row = fold.batches[batch_id]
            assert dict(row.lines) == dict(self.batch_lines[batch_id])
            assert dict(row.deducted) == dict(self.deducted[batch_id])
            assert row.paid == (batch.status == sd.PAID)
        assert set(fold.batches) == set(self.batches)


TestAuditorAgrees = AuditorAgrees.TestCase
TestAuditorAgrees.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
