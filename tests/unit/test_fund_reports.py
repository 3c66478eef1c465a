"""The fund-detail ledger (资金明细台账) and the bureau's daily report, folded from events alone:
each rule as the bureau and the auditor read it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import random
from zoneinfo import ZoneInfo

import openpyxl
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kernel.contract import budget, dailyreport, fundledger
from services.kernel.contract.budget import pool_stream
from services.kernel.contract.dailyreport import Day
from services.kernel.contract.fundledger import Movement
from services.kernel.contract.policy_document import default_policy
from services.kernel.contract.policy_proto import policy_to_proto
from services.kernel.events import Context, Envelope, new_envelope, payload_of, service_actor
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

LEDGER = Context(service_actor("ledger"))
SHANGHAI = "Asia/Shanghai"
# 2025-06-02 in Shanghai is 2025-06-01T16:00Z .. 2025-06-02T16:00Z.
DAY = Day(dt.date(2025, 6, 2), SHANGHAI)
BEFORE = dt.datetime(2025, 6, 1, 15, 0, tzinfo=dt.UTC)  # 23:00 on the 1st, local
MORNING = dt.datetime(2025, 6, 2, 2, 0, tzinfo=dt.UTC)  # 10:00 on the 2nd
EVENING = dt.datetime(2025, 6, 2, 15, 30, tzinfo=dt.UTC)  # 23:30 on the 2nd
AFTER = dt.datetime(2025, 6, 2, 16, 30, tzinfo=dt.UTC)  # 00:30 on the 3rd


def parts(**fen: int) -> list[common_pb2.SourceAmount]:
    return [common_pb2.SourceAmount(source=s.replace("_", "-"), fen=f) for s, f in fen.items()]


class Stream:
    """A pool's events as the ledger appends them, each at a chosen time."""

    def __init__(self, pool_id: str = "p") -> None:
        self.pool_id = pool_id
        self.envelopes: list[Envelope] = []
        self.versions: dict[str, int] = {}

    def add(self, event: Message, at: dt.datetime, stream: str | None = None) -> Envelope:
        stream_id = stream or self.stream
        version = self.versions[stream_id] = self.versions.get(stream_id, 0) + 1
        env = new_envelope("ledger", stream_id, event, LEDGER, version=version)
        env.occurred_at.FromDatetime(at)
        self.envelopes.append(env)
        return env

    @property
    def stream(self) -> str:
        return pool_stream(self.pool_id)

    def fund(self, source: str, fen: int, at: dt.datetime = BEFORE) -> None:
        self.add(ev.BudgetFunded(pool_id=self.pool_id, amount_fen=fen, source=source), at)

    def order(
        self,
        order_id: str,
        category: str,
        at: dt.datetime,
        *,
        refund_at: dt.datetime | None = None,
        **paid: int,
    ) -> None:
        fen = sum(paid.values())
        p = self.pool_id
        self.add(
            ev.SubsidyReserved(
                order_id=order_id,
                pool_id=p,
                category=category,
                subsidy_fen=fen,
                sources=parts(**paid),
            ),
            at,
        )
        self.add(
            ev.SubsidyCaptured(
                order_id=order_id,
                pool_id=p,
                subsidy_fen=fen,
                sources=parts(**paid),
                category=category,
            ),
            at,
        )
        if refund_at is not None:
            self.add(
                ev.SubsidyReleased(
                    order_id=order_id,
                    pool_id=p,
                    subsidy_fen=fen,
                    reason="REFUNDED",
                    was_captured=True,
                    sources=parts(**paid),
                    category=category,
                ),
                refund_at,
            )

    def clawback(self, order_id: str, fen: int, at: dt.datetime) -> None:
        self.add(
            ev.ClawbackRecorded(order_id=order_id, merchant_id="m-1", fen=fen, batch_id="b-1"),
            at,
            stream="merchant-settlement/m-1",
        )


def campaign() -> Stream:
    """Two sources pro rata (60/40), a tranche, orders before, during and after the day, a
    refund of a settled order and its clawback, a cancelled reservation."""
    s = Stream()
    s.fund("district", 600_000)
    s.fund("platform-matching", 400_000)
    s.order("o-0", "tv", BEFORE, district=6_000, platform_matching=4_000)
    s.order("o-1", "tv", MORNING, district=3_000, platform_matching=2_000)
    s.order("o-2", "phone", MORNING, refund_at=EVENING, district=1_200, platform_matching=800)
    s.clawback("o-2", 2_000, EVENING)
    s.add(
        ev.SubsidyReserved(
            order_id="o-3",
            pool_id="p",
            category="phone",
            subsidy_fen=500,
            sources=parts(district=500),
        ),
        MORNING,
    )
    s.add(
        ev.SubsidyReleased(
            order_id="o-3",
            pool_id="p",
            subsidy_fen=500,
            reason="CANCELLED",
            sources=parts(district=500),
            category="phone",
        ),
        MORNING,
    )
    s.add(
        ev.BudgetFunded(
            pool_id="p",
            amount_fen=100_000,
            source="district",
            tranches=[common_pb2.Tranche(amount_fen=100_000)],
        ),
        MORNING,
    )
    s.add(ev.TrancheReleased(pool_id="p", source="district", amount_fen=100_000), EVENING)
    s.order("o-4", "tv", AFTER, district=600, platform_matching=400)
    return s


def test_a_refund_credits_the_sources_that_paid_what_each_paid() -> None:
    rows = fundledger.movements(campaign().envelopes)
    refund = [m for m in rows if m.kind == fundledger.REFUNDED]
    assert [(m.source, m.amount_fen, m.order_id) for m in refund] == [
        ("district", 1_200, "o-2"),
        ("platform-matching", 800, "o-2"),
    ]
    captured = {m.source: m for m in rows if m.kind == fundledger.CAPTURED and m.order_id == "o-2"}
    for m in refund:  # spent goes back down by its part, available up by it
        assert m.spent_fen == captured[m.source].spent_fen - m.amount_fen
        assert m.available_fen == captured[m.source].available_fen + m.amount_fen


def test_the_balances_after_each_row_are_the_budget_folds_state_after_its_event() -> None:
    s = campaign()
    rows = fundledger.movements(s.envelopes)
    pool_events = [e for e in s.envelopes if e.stream_id == s.stream]
    for m in rows:
        prefix = [payload_of(e) for e in pool_events if e.stream_version <= m.stream_version]
        state = budget.fold("p", prefix).source(m.source)
        assert state is not None
        assert (m.funded_fen, m.scheduled_fen, m.available_fen, m.reserved_fen, m.spent_fen) == (
            state.funded,
            state.scheduled,
            state.available,
            state.reserved,
            state.spent,
        ), m
    assert {m.kind for m in rows} == set(fundledger.KINDS_WITH_CLAWBACK)


def test_every_movement_has_its_event_time_order_and_category() -> None:
    s = campaign()
    by_id = {e.event_id: e for e in s.envelopes}
    for m in fundledger.movements(s.envelopes):
        env = by_id[m.event_id]
        assert m.occurred_at == env.occurred_at.ToJsonString()
        if m.kind not in (fundledger.FUNDED, fundledger.SCHEDULED, fundledger.TRANCHE_RELEASED):
            assert m.order_id and m.category in ("tv", "phone")
    released = [m for m in fundledger.movements(s.envelopes) if m.kind == fundledger.RELEASED]
    assert [(m.order_id, m.reason, m.reserved_fen) for m in released] == [("o-3", "CANCELLED", 0)]


def test_a_clawback_is_owed_per_source_that_paid_and_moves_no_budget() -> None:
    rows = fundledger.movements(campaign().envelopes)
    i = next(i for i, m in enumerate(rows) if m.kind == fundledger.CLAWBACK)
    claw, refund = rows[i : i + 2], rows[i - 2 : i]
    assert [m.kind for m in refund] == [fundledger.REFUNDED] * 2  # right after the refund
    assert [(m.source, m.amount_fen, m.reason) for m in claw] == [
        ("district", 1_200, "b-1"),
        ("platform-matching", 800, "b-1"),
    ]
    for c, r in zip(claw, refund, strict=True):
        assert (c.available_fen, c.spent_fen) == (r.available_fen, r.spent_fen)


def test_the_rows_do_not_depend_on_the_order_the_events_were_read_in() -> None:
    s = campaign()
    shuffled = list(s.envelopes) + list(s.envelopes[:3])  # and some read twice
    random.Random(7).shuffle(shuffled)
    assert fundledger.movements(shuffled) == fundledger.movements(s.envelopes)
    assert (
        dailyreport.from_events(shuffled, DAY).csv()
        == dailyreport.from_events(s.envelopes, DAY).csv()
    )


def lines(report: dailyreport.DailyReport, section: str) -> list[dailyreport.Line]:
    return [x for x in report.lines if x.section == section]


def test_the_day_is_the_campaigns_local_day_and_its_figures_are_the_days_events() -> None:
    report = dailyreport.from_events(campaign().envelopes, DAY)
    cats = {x.category: x for x in lines(report, dailyreport.CATEGORY)}
    # o-0 (23:00 the day before) and o-4 (00:30 the day after, local) are not in it.
    assert (cats["tv"].orders, cats["tv"].subsidy_fen) == (1, 5_000)
    phone = cats["phone"]
    assert (phone.orders, phone.subsidy_fen, phone.refunds, phone.refunded_fen) == (
        1,
        2_000,
        1,
        2_000,
    )
    assert (phone.clawbacks, phone.clawback_fen) == (1, 2_000)
    the_day_after = dailyreport.from_events(
        campaign().envelopes, Day(dt.date(2025, 6, 3), SHANGHAI)
    )
    assert the_day_after.total().orders == 1  # o-4, 00:30 local


def test_the_days_totals_add_up() -> None:
    report = dailyreport.from_events(campaign().envelopes, DAY)
    flows = dailyreport.FLOWS
    total = report.total()
    cats = lines(report, dailyreport.CATEGORY)
    for f in flows:  # the categories add up to the total
        assert sum(getattr(x, f) for x in cats) == getattr(total, f), f
    for c in cats:  # the sources of a category add up to it (fen; each source counts the order)
        shares = [x for x in lines(report, dailyreport.SOURCE) if x.category == c.category]
        for f in ("subsidy_fen", "refunded_fen", "clawback_fen"):
            assert sum(getattr(x, f) for x in shares) == getattr(c, f), (c.category, f)
    pool = lines(report, dailyreport.POOL_REMAINING)
    sources = lines(report, dailyreport.SOURCE_REMAINING)
    for b in dailyreport.BALANCES:
        assert sum(getattr(x, b) for x in sources) == getattr(pool[0], b), b


def test_the_remaining_budget_is_the_pool_at_the_days_end() -> None:
    s = campaign()
    report = dailyreport.from_events(s.envelopes, DAY)
    until_midnight = [
        payload_of(e)
        for e in s.envelopes
        if e.stream_id == s.stream and e.occurred_at.ToDatetime(tzinfo=dt.UTC) < DAY.end
    ]
    pool = budget.fold("p", until_midnight)
    (remaining,) = lines(report, dailyreport.POOL_REMAINING)
    assert (remaining.funded_fen, remaining.available_fen, remaining.spent_fen) == (
        pool.funded,
        pool.available,
        pool.spent,
    )
    assert remaining.funded_fen == 1_100_000  # the tranche released at 23:30 is in
    assert remaining.spent_fen == 10_000 + 5_000  # o-0 and o-1; o-2 refunded; o-4 tomorrow


def test_the_files_are_the_same_bytes_for_the_same_events_and_show_the_same_cells() -> None:
    a = dailyreport.from_events(campaign().envelopes, DAY)
    b = dailyreport.from_events(campaign().envelopes, DAY)  # new event ids and envelopes
    assert a.csv() == b.csv()
    assert a.xlsx() == b.xlsx()
    sheet = openpyxl.load_workbook(io.BytesIO(a.xlsx())).active
    assert sheet is not None
    cells = [tuple("" if v is None else v for v in r) for r in sheet.iter_rows(values_only=True)]
    assert cells == [dailyreport.HEADERS, *a.rows()]
    assert a.csv().decode("utf-8-sig").splitlines()[0] == ",".join(dailyreport.HEADERS)


def test_a_changed_event_changes_the_report() -> None:
    s = campaign()
    honest = dailyreport.from_events(s.envelopes, DAY)
    i = next(
        i
        for i, e in enumerate(s.envelopes)
        if e.event_type == "subsidy.v1.SubsidyCaptured"
        and e.occurred_at.ToDatetime(tzinfo=dt.UTC) == MORNING
    )
    env = s.envelopes[i]
    captured = ev.SubsidyCaptured.FromString(env.payload)
    assert captured.order_id == "o-1"
    tampered = list(s.envelopes)
    forged = Envelope()
    forged.CopyFrom(env)
    captured.category = "phone"  # the same money, booked to another category
    forged.payload = captured.SerializeToString()
    tampered[i] = forged
    changed = dailyreport.from_events(tampered, DAY)
    assert changed.csv() != honest.csv()
    assert changed.xlsx() != honest.xlsx()
    moved = Envelope()
    moved.CopyFrom(env)
    moved.occurred_at.FromDatetime(AFTER)  # the same capture, a day later
    tampered[i] = moved
    assert dailyreport.from_events(tampered, DAY).csv() != honest.csv()


def test_a_formula_in_an_event_is_text_in_both_files() -> None:
    s = Stream()
    s.fund("district", 1_000)
    s.order("o-x", "=cmd|' /C calc'!A0", MORNING, district=100)
    report = dailyreport.from_events(s.envelopes, DAY)
    assert b"'=cmd" in report.csv()
    sheet = openpyxl.load_workbook(io.BytesIO(report.xlsx())).active
    assert sheet is not None
    assert all(
        not (isinstance(v, str) and v.startswith("="))
        for r in sheet.iter_rows(values_only=True)
        for v in r
    )


def test_the_campaign_timezone_is_the_policy_in_forces() -> None:
    policy = default_policy()
    published = new_envelope(
        "catalog",
        f"policy/{policy.version}",
        ev.PolicyPublished(version=policy.version, policy=policy_to_proto(policy)),
        Context(service_actor("catalog")),
        version=1,
    )
    later = policy.effective_from + dt.timedelta(days=1)
    assert dailyreport.campaign_timezone([published], later) == policy.claim_window.timezone


def test_select_keeps_the_running_balances_of_the_whole_stream() -> None:
    rows = fundledger.movements(campaign().envelopes)
    mine = fundledger.select(rows, "p", "platform-matching")
    assert mine and all(m.source == "platform-matching" for m in mine)
    assert mine == [m for m in rows if m.source == "platform-matching"]
    assert isinstance(mine[0], Movement) and dataclasses.is_dataclass(mine[0])


def test_an_order_written_before_sources_is_attributed_as_the_budget_fold_attributes_it() -> None:
    s = Stream()
    s.fund("district", 1_000)
    s.fund("platform-matching", 1_000)
    s.add(
        ev.SubsidyReserved(order_id="old", pool_id="p", category="tv", subsidy_fen=1_500), MORNING
    )
    s.add(ev.SubsidyCaptured(order_id="old", pool_id="p", subsidy_fen=1_500), MORNING)
    s.add(
        ev.SubsidyReleased(
            order_id="old", pool_id="p", subsidy_fen=1_500, reason="REFUNDED", was_captured=True
        ),
        EVENING,
    )
    rows = fundledger.movements(s.envelopes)
    # Priority in funding order, the capture and the refund moving what the reserve took.
    for kind in (fundledger.RESERVED, fundledger.CAPTURED, fundledger.REFUNDED):
        assert [(m.source, m.amount_fen, m.category) for m in rows if m.kind == kind] == [
            ("district", 1_000, "tv"),
            ("platform-matching", 500, "tv"),
        ]
    assert rows[-1].available_fen == 1_000 and rows[-1].spent_fen == 0


def test_a_clawback_other_than_the_refund_is_split_as_the_refund_was() -> None:
    s = Stream()
    s.fund("district", 10_000)
    s.fund("platform-matching", 10_000)
    s.order("o", "tv", MORNING, refund_at=EVENING, district=600, platform_matching=400)
    s.clawback("o", 501, EVENING)  # e.g. part of the order only
    claw = [m for m in fundledger.movements(s.envelopes) if m.kind == fundledger.CLAWBACK]
    assert [(m.source, m.amount_fen) for m in claw] == [
        ("district", 301),
        ("platform-matching", 200),
    ]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["fund", "reserve", "capture", "release", "clawback", "later"]),
        st.sampled_from(["district", "platform-matching"]),
        st.integers(1, 5_000),
        st.sampled_from(["tv", "phone", "=x"]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.randoms(use_true_random=False))
def test_any_history_gives_balances_the_budget_fold_has_and_days_that_add_up(
    ops: list[tuple[str, str, int, str]], rnd: random.Random
) -> None:
    """Random funds, reserves (pro rata, as the ledger splits), captures, cancels, refunds and
    clawbacks over several days: every row's balances are the budget fold's after its event,
    each day's figures are the day's events, the days add up to the history, and neither the
    order the events are read in nor reading one twice changes a byte."""
    s = Stream()
    at = BEFORE
    pool = budget.Pool("p")
    pending: dict[str, tuple[str, budget.Parts]] = {}
    captured: dict[str, tuple[str, budget.Parts]] = {}
    refunded: list[str] = []
    expected: dict[dt.date, dict[str, int]] = {}

    def day_of(when: dt.datetime) -> dict[str, int]:
        local = when.astimezone(ZoneInfo(SHANGHAI)).date()
        return expected.setdefault(local, dict.fromkeys(dailyreport.FLOWS, 0))

    for n, (op, source, fen, category) in enumerate(ops):
        at += dt.timedelta(hours=7)  # every 7th step is at midnight, local
        order = f"o-{n}"
        event: Message | None = None
        if op == "fund":
            event = ev.BudgetFunded(pool_id="p", amount_fen=fen, source=source)
        elif op == "reserve":
            split = budget.split_pro_rata(pool.payers(), fen)
            if split and all((pool.source(x) or budget.Source(x)).available >= f for x, f in split):
                pending[order] = (category, split)
                event = ev.SubsidyReserved(
                    order_id=order, pool_id="p", category=category, subsidy_fen=fen,
                    sources=budget.parts_message(split),
                )  # fmt: skip
        elif op == "capture" and pending:
            order = sorted(pending)[0]
            category, split = captured[order] = pending.pop(order)
            event = ev.SubsidyCaptured(
                order_id=order, pool_id="p", subsidy_fen=sum(f for _, f in split),
                sources=budget.parts_message(split), category=category,
            )  # fmt: skip
            day_of(at)["orders"] += 1
            day_of(at)["subsidy_fen"] += sum(f for _, f in split)
        elif op == "release" and (pending or captured):
            was = not pending or (bool(captured) and fen % 2 == 0)
            book = captured if was else pending
            order = sorted(book)[0]
            category, split = book.pop(order)
            event = ev.SubsidyReleased(
                order_id=order, pool_id="p", subsidy_fen=sum(f for _, f in split),
                reason="REFUNDED" if was else "CANCELLED", was_captured=was,
                sources=budget.parts_message(split), category=category,
            )  # fmt: skip
            if was:
                refunded.append(order)
                day_of(at)["refunds"] += 1
                day_of(at)["refunded_fen"] += sum(f for _, f in split)
        elif op == "clawback" and refunded:
            order = refunded.pop(0)
            owed = ev.ClawbackRecorded(order_id=order, merchant_id="m-1", fen=fen, batch_id="b")
            s.add(owed, at, stream="settlement/m-1")
            day_of(at)["clawbacks"] += 1
            day_of(at)["clawback_fen"] += fen
        if event is not None:
            s.add(event, at)
            pool = budget.apply(pool, event)

    rows = fundledger.movements(s.envelopes)
    pool_events = [e for e in s.envelopes if e.stream_id == s.stream]
    for m in rows:
        if m.kind == fundledger.CLAWBACK:
            continue
        state = budget.fold("p", [payload_of(e) for e in pool_events[: m.stream_version]])
        mine = state.source(m.source)
        assert mine is not None
        assert (m.available_fen, m.reserved_fen, m.spent_fen, m.funded_fen) == (
            mine.available,
            mine.reserved,
            mine.spent,
            mine.funded,
        )
    shuffled = [*s.envelopes, *s.envelopes[:2]]
    rnd.shuffle(shuffled)
    for date, figures in expected.items():
        report = dailyreport.daily_report(rows, Day(date, SHANGHAI))
        total = report.total()
        assert {f: getattr(total, f) for f in dailyreport.FLOWS} == figures, date
        for f in dailyreport.FLOWS:
            assert sum(getattr(x, f) for x in lines(report, dailyreport.CATEGORY)) == figures[f]
        assert dailyreport.from_events(shuffled, Day(date, SHANGHAI)).csv() == report.csv()


def test_midnight_belongs_to_the_day_it_starts() -> None:
    s = Stream()
    s.fund("district", 10_000)
    s.order("o", "tv", DAY.end, district=100)  # 00:00 on the 3rd, local
    assert dailyreport.from_events(s.envelopes, DAY).total().orders == 0
    following = Day(dt.date(2025, 6, 3), SHANGHAI)
    assert dailyreport.from_events(s.envelopes, following).total().orders == 1
    (left,) = lines(dailyreport.from_events(s.envelopes, DAY), dailyreport.POOL_REMAINING)
    assert (left.available_fen, left.spent_fen) == (10_000, 0)  # the order is the next day's


def test_what_the_ledger_sends_is_every_figure_of_every_row() -> None:
    from services.ledger.fundreports_api import movement, report_message
    from subsidyctl.cli.funds import row
    from subsidyctl.cli.report import lines_of

    s = campaign()
    report = dailyreport.from_events(s.envelopes, DAY)
    sent = report_message(report)
    assert (sent.date, sent.timezone, sent.csv, sent.xlsx) == (
        "2025-06-02",
        SHANGHAI,
        report.csv(),
        report.xlsx(),
    )
    assert lines_of(sent) == list(report.lines)
    for m in fundledger.movements(s.envelopes):
        shown = row(movement(m))
        assert list(shown) == list(fundledger.HEADERS)
        assert tuple(shown.values()) == fundledger.row(m)
