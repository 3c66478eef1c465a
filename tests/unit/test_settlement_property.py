"""Random fund / reserve / capture / evidence / release / refund / settle / clawback sequences,
decided by the ledger's pure decisions (``domain``, ``settlement_domain``) and folded by the
budget fold, checked at every step against a simple model:

- per source, funded = available + reserved + spent, available >= 0, and each figure is what the
  model's own sum of fundings and of the reservations' parts says;
- every fen paid to a merchant is covered by an evidenced, unrefunded capture or a recorded
  clawback: paid = (unrefunded lines of paid batches) + (clawbacks of their refunded lines)
  - (clawbacks those batches deducted), and no more than the unrefunded lines plus the
  clawbacks still outstanding;
- a batch pays only evidenced captures, an order at most once, a clawback is deducted at most
  once, and every refund of a batched order records exactly one clawback;
- multi-item orders (one reservation per item, keyed ``order_id/item``): refunding one item
  credits back exactly its sources, claws back exactly its subsidy when it was settled, and
  leaves every other item of the order as it was; the bill's view of an order is the sum of its
  captured items, refunded only once every item is; each call names exactly one item.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

from google.protobuf.message import Message
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.invariants import MerchantSettled, check_paid_covered
from services.kernel.contract import budget, order_line
from services.kernel.contract.policy import FundingRules, PaidAmount, Split
from services.kernel.errors import DomainError
from services.ledger import domain, reconcile
from services.ledger import settlement_domain as sd
from subsidy.v1 import events_pb2 as ev

POOL = "pool-1"
SOURCES = ("district", "platform-matching")
MERCHANTS = ("m-1", "m-2")
T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
PEOPLE = ("ops-a", "ops-b")


class Ledger(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = budget.Pool(POOL)
        self.funded: Counter[str] = Counter()
        self.reservations: dict[str, domain.Reservation] = {}
        self.merchant: dict[str, str] = {}
        self.captures: dict[str, sd.Capture] = {}
        self.clawbacks: list[sd.Clawback] = []
        self.batches: dict[str, sd.Batch] = {}
        self.batch_lines: dict[str, tuple[tuple[str, int], ...]] = {}
        self.deducted: dict[str, tuple[tuple[str, int], ...]] = {}
        self.evidenced_when_batched: list[bool] = []
        self.refunds_of_batched: list[str] = []
        self.clock = T0
        self.log: list[Message] = []  # every event, in order (the rebuild reads these)
        self.n = 0
        self.serials: dict[str, str] = {}  # the unit each reservation holds ("" for none)
        self.items: dict[str, tuple[str, ...]] = {}  # a multi-item order -> its item lines

    def _fold(self, events: list[Message], held: budget.Parts | None = None) -> None:
        for event in events:
            self.pool, _ = budget.step(self.pool, event, held)

    @rule(source=st.sampled_from(SOURCES), amount=st.integers(1, 300_000))
    def fund(self, source: str, amount: int) -> None:
        events = domain.fund(self.pool, amount, source)
        self._fold(events)
        self.funded[source] += amount

    @rule(
        subsidy=st.sampled_from([-1, 0, 10_000, 20_000, 30_000, 1, 7_777]),
        merchant=st.sampled_from(MERCHANTS),
        pro_rata=st.booleans(),
    )
    def reserve(self, subsidy: int, merchant: str, pro_rata: bool) -> None:
        self.n += 1
        order = f"o-{self.n}"
        rules = FundingRules(split=Split.PRO_RATA if pro_rata else Split.PRIORITY)
        reserved = ev.SubsidyReserved(
            order_id=order,
            pool_id=POOL,
            subsidy_fen=subsidy,
            merchant_id=merchant,
            unit_price_fen=subsidy * 4,
            serial=f"sn-{self.n}" if self.n % 3 == 0 else "",
        )
        try:
            events = domain.reserve(self.pool, reserved, rules)
        except DomainError:
            assert subsidy <= 0 or subsidy > self.pool.available or pro_rata
            return
        self._fold(events)
        res = domain.evolve(None, events[0])
        assert res is not None
        self.reservations[order] = res
        self.merchant[order] = merchant
        self.serials[order] = reserved.serial

    @rule(
        subsidies=st.lists(st.sampled_from([10_000, 20_000, 7_777, 1]), min_size=2, max_size=3),
        merchant=st.sampled_from(MERCHANTS),
        pro_rata=st.booleans(),
    )
    def reserve_order(self, subsidies: list[int], merchant: str, pro_rata: bool) -> None:
        """A multi-item order: one reservation per item (its own qualification), keyed
        ``order_id/item``; an item the pool cannot pay is refused alone."""
        self.n += 1
        order = f"o-{self.n}"
        rules = FundingRules(split=Split.PRO_RATA if pro_rata else Split.PRIORITY)
        lines = []
        for i, subsidy in enumerate(subsidies, start=1):
            key = order_line.line_of(order, str(i))
            reserved = ev.SubsidyReserved(
                order_id=key,
                pool_id=POOL,
                subsidy_fen=subsidy,
                merchant_id=merchant,
                unit_price_fen=subsidy * 4,
                qualification_id=f"q-{key}",
                serial=f"sn-{self.n}-{i}" if i == 2 else "",
                item=str(i),
            )
            try:
                events = domain.reserve(self.pool, reserved, rules)
            except DomainError:
                assert subsidy > self.pool.available or pro_rata
                continue
            self._fold(events)
            res = domain.evolve(None, events[0])
            assert res is not None and res.qualification_id == f"q-{key}"
            self.reservations[key] = res
            self.merchant[key] = merchant
            self.serials[key] = reserved.serial
            lines.append(key)
        if lines:
            self.items[order] = tuple(lines)

    def _pick(self, data: st.DataObject, pool: list[str]) -> str:
        return data.draw(st.sampled_from(sorted(pool)))

    @precondition(lambda self: bool(self.reservations))
    @rule(data=st.data(), exact=st.booleans())
    def capture(self, data: st.DataObject, exact: bool) -> None:
        order = self._pick(data, list(self.reservations))
        res = self.reservations[order]
        paid = res.unit_price_fen - res.subsidy_fen + (0 if exact else 1)
        try:
            events = domain.capture(res, f"pay-{order}", paid, PaidAmount.REFUSE)
        except DomainError as err:
            assert res.status == domain.RELEASED or (not exact and res.status == domain.PENDING)
            assert err.reason in ("RESERVATION_NOT_PENDING", domain.PAID_AMOUNT_MISMATCH)
            return
        if not events:
            assert res.status == domain.CAPTURED
            return
        self._fold(events, res.sources)
        self.reservations[order] = domain.evolve(res, events[0]) or res
        self.clock += dt.timedelta(hours=1)
        self.captures[order] = sd.Capture(
            order,
            self.merchant[order],
            res.subsidy_fen,
            self.clock,
            serial=self.serials[order],
        )

    @precondition(lambda self: bool(self.captures))
    @rule(data=st.data(), kind=st.sampled_from(sd.EVIDENCE_KINDS), right_serial=st.booleans())
    def evidence(self, data: st.DataObject, kind: str, right_serial: bool) -> None:
        order = self._pick(data, list(self.captures))
        c = self.captures[order]
        serial = (c.serial if right_serial else "sn-other") if kind == sd.ACTIVATION else ""
        cmd = sd.RecordEvidence(order, kind, f"ref-{order}", serial)
        try:
            events = sd.record_evidence(c, cmd)
        except DomainError as err:
            assert (
                c.refunded
                or c.evidence is not None
                or (c.serial and (kind != sd.ACTIVATION or not right_serial))
                or (not c.serial and serial)
            ), err.reason
            return
        for event in events:
            self.captures[order] = sd.evolve_capture(self.captures[order], event) or c

    @precondition(lambda self: bool(self.reservations))
    @rule(data=st.data(), refund=st.booleans())
    def release(self, data: st.DataObject, refund: bool) -> None:
        order = self._pick(data, list(self.reservations))
        res = self.reservations[order]
        try:
            events = domain.release(res, "REFUNDED" if refund else "CANCELLED")
        except DomainError:
            assert res.status == (domain.PENDING if refund else domain.CAPTURED)
            return
        if not events:
            return
        self._fold(events, res.sources)
        self.reservations[order] = domain.evolve(res, events[0]) or res
        if order in self.captures:  # a refund: settlement claws a batched order back
            captured = self.captures[order]
            claws = sd.clawback(captured)
            self.log += [*events, *claws]
            for event in [*events, *claws]:
                self.clawbacks = sd.evolve_clawbacks(self.clawbacks, event)
                self.captures[order] = sd.evolve_capture(self.captures[order], event) or captured
            if captured.batch_id:
                self.refunds_of_batched.append(order)

    @rule(
        subsidies=st.lists(st.sampled_from([10_000, 20_000, 7_777]), min_size=2, max_size=3),
        merchant=st.sampled_from(MERCHANTS),
    )
    def settled_order(self, subsidies: list[int], merchant: str) -> None:
        """A multi-item order taken through payment, evidence and a paid batch at once, so
        that partial refunds after settlement (the clawback of one item) are common."""
        known = set(self.items)
        self.reserve_order(subsidies, merchant, pro_rata=False)
        for order_id in set(self.items) - known:
            for key in self.items[order_id]:
                self.capture(_Drawn(key), exact=True)
                kind = sd.ACTIVATION if self.serials[key] else sd.COURIER
                self.evidence(_Drawn(key), kind, right_serial=True)
        self.settle_and_pay(merchant)

    def _refundable_items(self) -> list[str]:
        return [
            key
            for keys in self.items.values()
            for key in keys
            if self.reservations[key].status == domain.CAPTURED
        ]

    @precondition(lambda self: bool(self._refundable_items()))
    @rule(data=st.data())
    def refund_one_item(self, data: st.DataObject) -> None:
        """A partial refund: one item of a multi-item order, named by order and item."""
        self._refund_item(self._pick(data, self._refundable_items()))

    def _settled_items(self) -> list[str]:
        return [k for k in self._refundable_items() if self.captures[k].batch_id]

    @precondition(lambda self: bool(self._settled_items()))
    @rule(data=st.data())
    def refund_one_settled_item(self, data: st.DataObject) -> None:
        """A partial refund after the merchant was settled for the item (the clawback case)."""
        self._refund_item(self._pick(data, self._settled_items()))

    def _refund_item(self, key: str) -> None:
        order_id, item = order_line.split_line(key)
        assert domain.locate(order_id, item, frozenset(self.items[order_id])) == key
        res = self.reservations[key]
        siblings = {k: self.reservations[k] for k in self.items[order_id] if k != key}
        sibling_captures = {k: self.captures.get(k) for k in siblings}
        before = self.pool
        events = domain.release(res, "REFUNDED")
        [released] = events
        assert isinstance(released, ev.SubsidyReleased)
        # Exactly this item's money and qualification, back to the sources that paid it.
        assert (released.order_id, released.qualification_id) == (key, res.qualification_id)
        assert budget.parts_of(released.sources) == res.sources
        self._fold(events, res.sources)
        assert self.pool.spent == before.spent - res.subsidy_fen
        assert self.pool.available == before.available + res.subsidy_fen
        self.reservations[key] = domain.evolve(res, released) or res
        captured = self.captures[key]
        claws = sd.clawback(captured)
        # Clawed back exactly this item's subsidy if a batch paid it; nothing otherwise.
        assert [(c.order_id, c.fen) for c in claws] == (  # type: ignore[attr-defined]
            [(key, captured.subsidy_fen)] if captured.batch_id else []
        )
        self.log += [*events, *claws]
        for event in [*events, *claws]:
            self.clawbacks = sd.evolve_clawbacks(self.clawbacks, event)
            self.captures[key] = sd.evolve_capture(self.captures[key], event) or captured
        if captured.batch_id:
            self.refunds_of_batched.append(key)
        # The other items stay exactly as they were.
        assert {k: self.reservations[k] for k in siblings} == siblings
        assert {k: self.captures.get(k) for k in siblings} == sibling_captures

    @rule(merchant=st.sampled_from(MERCHANTS), maker=st.sampled_from(PEOPLE))
    def create_batch(self, merchant: str, maker: str) -> None:
        batch_id = f"b-{len(self.batches) + 1}"
        cmd = sd.CreateBatch(batch_id, merchant, T0, self.clock + dt.timedelta(hours=1))
        try:
            events = sd.create_batch(None, self.captures.values(), self.clawbacks, cmd)
        except DomainError as err:
            assert err.reason == "NOTHING_TO_SETTLE"
            return
        [created] = events
        assert isinstance(created, ev.SettlementBatchCreated)
        assert created.net_fen >= 0 and created.net_fen == created.gross_fen - created.clawback_fen
        for line in created.lines:
            c = self.captures[line.order_id]
            self.evidenced_when_batched.append(c.evidence is not None and not c.refunded)
            self.captures[line.order_id] = sd.evolve_capture(c, created) or c
        self.clawbacks = sd.evolve_clawbacks(self.clawbacks, created)
        self.log.append(created)
        batch = sd.evolve_batch(None, created, maker)
        assert batch is not None
        self.batches[batch_id] = batch
        self.batch_lines[batch_id] = tuple((li.order_id, li.subsidy_fen) for li in created.lines)
        self.deducted[batch_id] = tuple((c.order_id, c.fen) for c in created.clawbacks)

    def _batched(self) -> list[str]:
        return [o for o, c in self.captures.items() if c.batch_id and not c.refunded]

    @precondition(lambda self: bool(self._batched()))
    @rule(data=st.data())
    def refund_settled(self, data: st.DataObject) -> None:
        """A refund of an order a batch already included (the clawback case), on purpose."""
        order = self._pick(data, self._batched())
        res = self.reservations[order]
        events = domain.release(res, "REFUNDED")
        self._fold(events, res.sources)
        self.reservations[order] = domain.evolve(res, events[0]) or res
        captured = self.captures[order]
        claws = sd.clawback(captured)
        assert len(claws) == 1
        self.log += [*events, *claws]
        for event in [*events, *claws]:
            self.clawbacks = sd.evolve_clawbacks(self.clawbacks, event)
            self.captures[order] = sd.evolve_capture(self.captures[order], event) or captured
        self.refunds_of_batched.append(order)

    @rule(merchant=st.sampled_from(MERCHANTS))
    def settle_and_pay(self, merchant: str) -> None:
        """A whole cycle at once (create, approve by the other person, pay), so that deep
        sequences (paid batches, refunds after them, clawbacks deducted) are common."""
        before = set(self.batches)
        self.create_batch(merchant, PEOPLE[0])
        for batch_id in set(self.batches) - before:
            batch = self.batches[batch_id]
            for event in sd.approve_batch(batch, batch_id, PEOPLE[1]):
                batch = sd.evolve_batch(batch, event, PEOPLE[1]) or batch
            events = sd.mark_paid(batch, batch_id, f"xfer-{batch_id}")
            self.log += events
            for event in events:
                batch = sd.evolve_batch(batch, event, "ops") or batch
            self.batches[batch_id] = batch

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data(), approver=st.sampled_from(PEOPLE))
    def approve(self, data: st.DataObject, approver: str) -> None:
        batch_id = self._pick(data, list(self.batches))
        batch = self.batches[batch_id]
        try:
            events = sd.approve_batch(batch, batch_id, approver)
        except DomainError as err:
            assert err.reason == "MAKER_CHECKER" and approver == batch.created_by
            return
        for event in events:
            self.batches[batch_id] = sd.evolve_batch(batch, event, approver) or batch

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def pay(self, data: st.DataObject) -> None:
        batch_id = self._pick(data, list(self.batches))
        batch = self.batches[batch_id]
        try:
            events = sd.mark_paid(batch, batch_id, f"xfer-{batch_id}")
        except DomainError as err:
            assert err.reason == "BATCH_NOT_APPROVED" and batch.status == sd.CREATED
            return
        self.log += events
        for event in events:
            self.batches[batch_id] = sd.evolve_batch(batch, event, "ops") or batch

    @invariant()
    def every_source_balances(self) -> None:
        reserved: Counter[str] = Counter()
        spent: Counter[str] = Counter()
        for res in self.reservations.values():
            if res.status == domain.RELEASED:
                continue
            bucket = reserved if res.status == domain.PENDING else spent
            for name, fen in res.sources:
                bucket[name] += fen
        for name in SOURCES:
            found = self.pool.source(name) or budget.Source(name)
            assert found.funded == found.available + found.reserved + found.spent
            assert found.available >= 0
            assert (found.funded, found.reserved, found.spent) == (
                self.funded[name],
                reserved[name],
                spent[name],
            )

    @invariant()
    def the_bill_lists_each_order_once_with_all_its_items(self) -> None:
        for order_id, keys in self.items.items():
            captured = [
                reconcile.Capture(
                    order_id,
                    "",
                    self.captures[k].subsidy_fen,
                    self.clock,
                    refunded=self.reservations[k].status == domain.RELEASED,
                )
                for k in keys
                if k in self.captures
            ]
            if captured:
                order = reconcile.order_capture(captured)
                assert order.subsidy_fen == sum(
                    self.captures[k].subsidy_fen for k in keys if k in self.captures
                )
                assert order.refunded == all(
                    self.reservations[k].status == domain.RELEASED
                    for k in keys
                    if k in self.captures
                )
            for key in keys:
                assert domain.locate(*order_line.split_line(key), frozenset(keys)) == key
            try:
                domain.locate(order_id, "99", frozenset(keys))
            except DomainError as err:
                assert err.reason == "UNKNOWN_ITEM"
            else:
                raise AssertionError("an item the order does not have was located")

    @invariant()
    def the_events_alone_add_up_the_same(self) -> None:
        rebuilt = sd.settled(self.log)
        for merchant, figures in rebuilt.items():
            check_paid_covered(merchant, figures)
            paid = sum(
                b.net_fen
                for b in self.batches.values()
                if b.merchant_id == merchant and b.status == sd.PAID
            )
            assert figures.paid == paid

    @invariant()
    def every_fen_paid_is_covered(self) -> None:
        assert all(self.evidenced_when_batched)
        batched = [o for lines in self.batch_lines.values() for o, _ in lines]
        assert len(batched) == len(set(batched))  # an order in one batch at most
        taken = [o for d in self.deducted.values() for o, _ in d]
        assert len(taken) == len(set(taken))  # a clawback deducted once at most
        clawed = Counter(c.order_id for c in self.clawbacks)
        assert sorted(clawed) == sorted(self.refunds_of_batched)
        assert set(clawed.values()) <= {1}
        claws = {c.order_id: c.fen for c in self.clawbacks}
        for merchant in MERCHANTS:
            paid_batches = [
                b
                for b in self.batches.values()
                if b.merchant_id == merchant and b.status == sd.PAID
            ]
            paid = sum(b.net_fen for b in paid_batches)
            lines = [li for b in paid_batches for li in self.batch_lines[b.batch_id]]
            unrefunded = sum(fen for o, fen in lines if not self.captures[o].refunded)
            refunded = sum(claws[o] for o, _ in lines if self.captures[o].refunded)
            deducted = sum(fen for b in paid_batches for _, fen in self.deducted[b.batch_id])
            assert paid == unrefunded + refunded - deducted
            outstanding = sum(
                c.fen for c in self.clawbacks if c.merchant_id == merchant and not c.deducted_by
            )
            assert paid <= unrefunded + outstanding + sum(
                fen
                for b in self.batches.values()
                if b.merchant_id == merchant and b.status != sd.PAID
                for _, fen in self.deducted[b.batch_id]
            )


TestLedgerSequences = Ledger.TestCase
TestLedgerSequences.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


class _Drawn:
    """A data() stand-in that draws the given value (to run the machine on a chosen path)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def draw(self, strategy: object) -> str:
        return self.value


def test_a_clawback_deducted_by_a_later_paid_batch_keeps_every_fen_covered() -> None:
    """The deepest path, spelled out (random runs reach it rarely): paid, refunded, clawed
    back, deducted from the next paid batch."""
    m = Ledger()
    m.fund("district", 100_000)
    for n in (1, 2):
        m.reserve(10_000, "m-1", pro_rata=False)
        m.capture(_Drawn(f"o-{n}"), exact=True)
        m.evidence(_Drawn(f"o-{n}"), sd.COURIER, right_serial=True)
        m.settle_and_pay("m-1")
        if n == 1:
            m.refund_settled(_Drawn("o-1"))
    [(merchant, figures)] = sd.settled(m.log).items()
    assert (merchant, figures) == ("m-1", MerchantSettled(10_000, 10_000, 10_000, 10_000))
    m.every_source_balances()
    m.every_fen_paid_is_covered()
    m.the_events_alone_add_up_the_same()


def test_refunding_one_settled_item_claws_back_that_item_only() -> None:
    """A 3-item order, captured, evidenced and settled; one item refunded: its subsidy is
    clawed back and its sources credited, the other two stay captured and paid."""
    m = Ledger()
    m.fund("district", 100_000)
    m.reserve_order([10_000, 20_000, 7_777], "m-1", pro_rata=False)
    keys = m.items["o-1"]
    assert keys == ("o-1/1", "o-1/2", "o-1/3")
    for key in keys:
        m.capture(_Drawn(key), exact=True)
        right = key == "o-1/2"  # the serialised unit: activated, of that very unit
        m.evidence(_Drawn(key), sd.ACTIVATION if right else sd.COURIER, right_serial=True)
    m.settle_and_pay("m-1")
    assert m.pool.spent == 37_777
    m.refund_one_settled_item(_Drawn("o-1/2"))
    assert [(c.order_id, c.fen) for c in m.clawbacks] == [("o-1/2", 20_000)]
    assert m.pool.spent == 17_777 and m.pool.available == 100_000 - 17_777
    assert [m.reservations[k].status for k in keys] == [
        domain.CAPTURED,
        domain.RELEASED,
        domain.CAPTURED,
    ]
    [(merchant, figures)] = sd.settled(m.log).items()
    assert merchant == "m-1" and figures.paid == 37_777
    m.every_source_balances()
    m.every_fen_paid_is_covered()
    m.the_events_alone_add_up_the_same()
    m.the_bill_lists_each_order_once_with_all_its_items()
