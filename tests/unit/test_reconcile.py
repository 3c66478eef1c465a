"""Discount-bill reconciliation, pure (services/ledger/reconcile.py): the bill's edge checks,
every kind of discrepancy, duplicates, refunded captures, the period, and totals exact in fen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kernel.errors import AlreadyExists, InvalidArgument
from services.ledger import reconcile
from services.ledger.reconcile import (
    AMOUNT_MISMATCH,
    DUPLICATE,
    KINDS,
    MATCHED,
    MISSING_IN_BILL,
    MISSING_IN_LEDGER,
    PAYMENT_REF_MISMATCH,
    REFUNDED_IN_BILL,
    BillRow,
    Capture,
    Period,
    Totals,
)
from subsidy.v1 import events_pb2 as ev

HEADER = "order_id,payment_ref,discount_fen,paid_at\n"
T0 = datetime(2025, 6, 1, 2, 0, tzinfo=UTC)  # 10:00 in Shenzhen


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def bill(*lines: str, bom: bool = False) -> bytes:
    return (("\ufeff" if bom else "") + HEADER + "".join(f"{x}\n" for x in lines)).encode()


def row(line: int, order: str, ref: str, fen: int, minutes: int) -> BillRow:
    return BillRow(line, order, ref, fen, at(minutes))


def cap(order: str, ref: str, fen: int, minutes: int, refunded: bool = False) -> Capture:
    return Capture(order, ref, fen, at(minutes), refunded)


def errors_of(data: bytes) -> list[tuple[int, str, str]]:
    return [(e.line, e.column, e.reason) for e in reconcile.read_bill(data).errors]


# --------------------------------------------------------------------------------------------
# the bill at the edge


def test_a_good_bill_is_read_with_its_lines_in_utc_and_a_bom_is_fine() -> None:
    parsed = reconcile.read_bill(
        bill(
            "o-1,pay-1,45000,2025-06-01T10:00:00+08:00",
            " o-2 , pay-2 ,200000,2025-06-01T02:30:00Z",
            "",  # an empty line is not a row
            "o-3,pay-3,1,2025-06-01T10:59:59.5+08:00",
            bom=True,
        )
    )
    assert parsed.errors == [] and parsed.total_rows == 3
    assert parsed.rows == [
        BillRow(2, "o-1", "pay-1", 45_000, at(0)),
        BillRow(3, "o-2", "pay-2", 200_000, at(30)),
        BillRow(5, "o-3", "pay-3", 1, at(59) + timedelta(seconds=59.5)),
    ]


@pytest.mark.parametrize(
    "header",
    [
        "order_id,payment_ref,discount_fen\n",
        "order_id,payment_ref,paid_at,discount_fen\n",
        "order_id,payment_ref,discount_fen,paid_at,extra\n",
        "订单号,支付单号,立减金额,支付时间\n",
        "\n",
    ],
)
def test_the_header_must_be_exactly_the_four_columns(header: str) -> None:
    data = (header + "o-1,pay-1,100,2025-06-01T10:00:00+08:00\n").encode()
    with pytest.raises(InvalidArgument) as err:
        reconcile.read_bill(data)
    assert (err.value.reason, err.value.field, err.value.metadata["line"]) == (
        "WRONG_HEADER",
        "csv",
        "1",
    )


@pytest.mark.parametrize(
    ("cells", "column", "reason"),
    [
        ("o-1,pay-1,-5,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,0,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,450.00,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,１００,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,10000000001,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,,2025-06-01T10:00:00+08:00", "discount_fen", "INVALID_AMOUNT"),
        ("o-1,pay-1,100,2025-06-01T10:00:00", "paid_at", "INVALID_TIME"),  # no offset
        ("o-1,pay-1,100,2025-06-01", "paid_at", "INVALID_TIME"),
        ("o-1,pay-1,100,2025-06-01+08:00", "paid_at", "INVALID_TIME"),
        ("o-1,pay-1,100,yesterday", "paid_at", "INVALID_TIME"),
        ("o-1,pay-1,100,", "paid_at", "INVALID_TIME"),
        ("o 1,pay-1,100,2025-06-01T10:00:00+08:00", "order_id", "INVALID_IDENTIFIER"),
        (",pay-1,100,2025-06-01T10:00:00+08:00", "order_id", "MISSING_FIELD"),
        ("o-" + "1" * 63 + ",pay-1,100,2025-06-01T10:00:00+08:00", "order_id", "FIELD_TOO_LONG"),
        ("o-1,,100,2025-06-01T10:00:00+08:00", "payment_ref", "MISSING_FIELD"),
        ("o-1," + "p" * 129 + ",100,2025-06-01T10:00:00+08:00", "payment_ref", "FIELD_TOO_LONG"),
        ('o-1,"pay\x01",100,2025-06-01T10:00:00+08:00', "payment_ref", "INVALID_TEXT"),
        ("o-1,pay-1,100", "", "WRONG_COLUMN_COUNT"),
        ("o-1,pay-1,100,2025-06-01T10:00:00+08:00,x", "", "WRONG_COLUMN_COUNT"),
    ],
)
def test_a_malformed_row_is_reported_with_its_line_and_column(
    cells: str, column: str, reason: str
) -> None:
    data = bill("o-0,pay-0,100,2025-06-01T10:00:00+08:00", cells)
    assert errors_of(data) == [(3, column, reason)]


def test_every_bad_row_is_reported_by_the_line_it_starts_on() -> None:
    data = bill(
        "o-1,pay-1,100,2025-06-01T10:00:00+08:00",
        'o-2,"pay\n2",100,2025-06-01T10:00:00+08:00',  # a quoted field spans lines 3 and 4
        "o-3,pay-3,100,2025-06-01T10:00:00",
        "o-4,pay-4,100,2025-06-01T10:00:00+08:00",
    )
    parsed = reconcile.read_bill(data)
    # A line break inside a cell is a control character there: the row is malformed.
    assert [(e.line, e.column) for e in parsed.errors] == [(3, "payment_ref"), (5, "paid_at")]
    assert (parsed.bad_rows, len(parsed.rows), parsed.total_rows) == (2, 2, 4)
    assert [r.line for r in parsed.rows] == [2, 6]


def test_bad_rows_beyond_the_listed_ones_are_still_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "MAX_LISTED_ERRORS", 2)
    parsed = reconcile.read_bill(bill(*[f"o-{i},p,x,2025-06-01T10:00:00Z" for i in range(5)]))
    assert ([e.line for e in parsed.errors], parsed.bad_rows) == ([2, 3], 5)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "EMPTY_BILL"),
        (b"  \n", "EMPTY_BILL"),
        (HEADER.encode(), "EMPTY_BILL"),
        (HEADER.encode() + b"o-1,pay-\xff,100,2025-06-01T10:00:00Z\n", "INVALID_ENCODING"),
        (HEADER.encode() + b"o-1,pay\x00,100,2025-06-01T10:00:00Z\n", "MALFORMED_CSV"),
        (HEADER.encode() + b'o-1,"pay,100,2025-06-01T10:00:00Z\n', "MALFORMED_CSV"),
    ],
)
def test_a_bill_that_is_not_a_csv_of_rows_is_refused_whole(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        reconcile.read_bill(data)
    assert (err.value.reason, err.value.field) == (reason, "csv")


def test_the_bad_encoding_names_its_line() -> None:
    data = bill("o-1,pay-1,100,2025-06-01T10:00:00Z") + b"o-2,\xfe,1,2025-06-01T10:00:00Z\n"
    with pytest.raises(InvalidArgument) as err:
        reconcile.read_bill(data)
    assert err.value.metadata["line"] == "3"


def test_a_bill_is_bounded_in_rows_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    good = bill(*[f"o-{i},p-{i},100,2025-06-01T10:00:00Z" for i in range(4)])
    monkeypatch.setattr(reconcile, "MAX_BILL_ROWS", 3)
    with pytest.raises(InvalidArgument) as err:
        reconcile.read_bill(good)
    assert err.value.reason == "TOO_MANY_ROWS"
    monkeypatch.setattr(reconcile, "MAX_BILL_ROWS", 4)
    assert len(reconcile.read_bill(good).rows) == 4
    monkeypatch.setattr(reconcile, "MAX_BILL_BYTES", len(good) - 1)
    with pytest.raises(InvalidArgument) as err:
        reconcile.read_bill(good)
    assert err.value.reason == "BILL_TOO_LARGE"


def test_a_hundred_thousand_rows_are_read() -> None:
    data = bill(
        *[f"o-{i},pay-{i},{1 + i % 50_000},2025-06-01T10:00:00+08:00" for i in range(100_000)]
    )
    parsed = reconcile.read_bill(data)
    assert (len(parsed.rows), parsed.errors, parsed.rows[-1].line) == (100_000, [], 100_001)


# --------------------------------------------------------------------------------------------
# the period


def test_the_default_period_is_the_first_to_the_last_payment_both_included() -> None:
    rows = [row(2, "a", "p", 1, 10), row(3, "b", "p", 1, 0), row(4, "c", "p", 1, 60)]
    p = reconcile.period(rows, None, None)
    assert (p.start, p.given) == (at(0), False)
    assert at(0) in p and at(60) in p and at(60) + timedelta(microseconds=1) not in p
    assert at(0) - timedelta(microseconds=1) not in p


def test_a_given_period_includes_its_start_and_excludes_its_end() -> None:
    p = reconcile.period([], at(0), at(60))
    assert p.given and at(0) in p and at(59) in p and at(60) not in p


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (at(0), None, "period_from"),
        (None, at(0), "period_from"),
        (at(0), at(0), "period_to"),
        (at(5), at(0), "period_to"),
        (datetime(2025, 6, 1), datetime(2025, 6, 2), "period_from"),  # no offset
    ],
)
def test_a_period_is_both_ends_in_order_with_offsets(
    start: datetime | None, end: datetime | None, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        reconcile.period([row(2, "a", "p", 1, 0)], start, end)
    assert (err.value.reason, err.value.field) == ("INVALID_PERIOD", field)


# --------------------------------------------------------------------------------------------
# matching

WHOLE_DAY = Period(at(-60), at(24 * 60))


def kinds(report: reconcile.Report) -> list[tuple[str, str]]:
    return [(d.kind, d.order_id) for d in report.discrepancies]


def test_a_bill_that_agrees_with_the_ledger_has_no_lines() -> None:
    rows = [row(2, "o-1", "pay-1", 45_000, 0), row(3, "o-2", "pay-2", 200_000, 5)]
    captures = {"o-1": cap("o-1", "pay-1", 45_000, 1), "o-2": cap("o-2", "pay-2", 200_000, 6)}
    report = reconcile.match(rows, captures, WHOLE_DAY)
    assert report.discrepancies == ()
    assert report.totals[MATCHED] == Totals(2, 245_000, 245_000)
    assert (report.bill_total_fen, report.ledger_total_fen) == (245_000, 245_000)


def test_each_kind_of_discrepancy_is_found_with_its_fen_on_each_side() -> None:
    rows = [
        row(2, "matched", "pay-m", 100, 0),
        row(3, "amount", "pay-a", 45_000, 1),  # the ledger captured 40,000
        row(4, "ref", "pay-WRONG", 300, 2),
        row(5, "unknown", "pay-u", 700, 3),  # the ledger never captured it
        row(6, "refunded", "pay-r", 500, 4),
        row(7, "matched", "pay-m", 100, 5),  # listed twice
        row(8, "pending", "pay-p", 900, 6),
    ]
    captures = {
        "matched": cap("matched", "pay-m", 100, 0),
        "amount": cap("amount", "pay-a", 40_000, 1),
        "ref": cap("ref", "pay-ref", 300, 2),
        "refunded": cap("refunded", "pay-r", 500, 4, refunded=True),
        "not-listed": cap("not-listed", "pay-n", 2_000, 30),
        "refunded-not-listed": cap("refunded-not-listed", "pay-x", 8_000, 31, refunded=True),
        "before": cap("before", "pay-b", 9_000, -120),  # before the period: not this bill's
    }
    report = reconcile.match(rows, captures, WHOLE_DAY, {"pending": "PENDING"})
    assert kinds(report) == [
        (AMOUNT_MISMATCH, "amount"),
        (MISSING_IN_LEDGER, "unknown"),
        (MISSING_IN_LEDGER, "pending"),
        (MISSING_IN_BILL, "not-listed"),
        (PAYMENT_REF_MISMATCH, "ref"),
        (REFUNDED_IN_BILL, "refunded"),
        (DUPLICATE, "matched"),
    ]
    t = report.totals
    assert t[MATCHED] == Totals(1, 100, 100)
    assert t[AMOUNT_MISMATCH] == Totals(1, 45_000, 40_000)
    assert t[PAYMENT_REF_MISMATCH] == Totals(1, 300, 300)
    assert t[MISSING_IN_LEDGER] == Totals(2, 1_600, 0)
    assert t[MISSING_IN_BILL] == Totals(1, 0, 2_000)
    assert t[REFUNDED_IN_BILL] == Totals(1, 500, 0)  # owed nothing
    assert t[DUPLICATE] == Totals(1, 100, 0)
    assert report.bill_total_fen == 100 + 45_000 + 300 + 700 + 500 + 100 + 900
    assert report.ledger_total_fen == 100 + 40_000 + 300 + 2_000
    by_order = {d.order_id: d for d in report.discrepancies if d.kind != DUPLICATE}
    amount = by_order["amount"]
    assert (amount.line, amount.bill_fen, amount.ledger_fen, amount.difference_fen) == (
        3,
        45_000,
        40_000,
        5_000,
    )
    assert (amount.paid_at, amount.captured_at, amount.ledger_status) == (at(1), at(1), "CAPTURED")
    ref = by_order["ref"]
    assert (ref.bill_payment_ref, ref.ledger_payment_ref) == ("pay-WRONG", "pay-ref")
    assert (by_order["pending"].ledger_status, by_order["unknown"].ledger_status) == ("PENDING", "")
    missing = by_order["not-listed"]
    assert (missing.line, missing.paid_at, missing.captured_at) == (0, None, at(30))
    assert by_order["refunded"].ledger_status == "REFUNDED"
    duplicate = report.discrepancies[-1]
    assert (duplicate.line, duplicate.first_line, duplicate.bill_fen) == (7, 2, 100)


def test_a_different_amount_is_an_amount_mismatch_even_when_the_reference_differs_too() -> None:
    report = reconcile.match(
        [row(2, "o", "pay-bill", 101, 0)], {"o": cap("o", "pay-ledger", 100, 0)}, WHOLE_DAY
    )
    assert kinds(report) == [(AMOUNT_MISMATCH, "o")]
    d = report.discrepancies[0]
    assert (d.bill_payment_ref, d.ledger_payment_ref, d.difference_fen) == (
        "pay-bill",
        "pay-ledger",
        1,
    )


def test_a_capture_without_a_payment_reference_does_not_match_one() -> None:
    report = reconcile.match([row(2, "o", "pay-1", 100, 0)], {"o": cap("o", "", 100, 0)}, WHOLE_DAY)
    assert kinds(report) == [(PAYMENT_REF_MISMATCH, "o")]


def test_every_duplicate_points_at_the_first_line_and_only_the_first_is_matched() -> None:
    rows = [
        row(2, "o", "pay-1", 100, 0),
        row(3, "o", "pay-1", 100, 0),
        row(4, "o", "pay-2", 999, 1),  # same order, other content: still a duplicate
    ]
    report = reconcile.match(rows, {"o": cap("o", "pay-1", 100, 0)}, WHOLE_DAY)
    assert [(d.kind, d.line, d.first_line) for d in report.discrepancies] == [
        (DUPLICATE, 3, 2),
        (DUPLICATE, 4, 2),
    ]
    assert report.totals[MATCHED] == Totals(1, 100, 100)
    assert report.totals[DUPLICATE] == Totals(2, 1_099, 0)
    assert (report.bill_total_fen, report.ledger_total_fen) == (1_199, 100)


def test_a_duplicate_of_an_order_the_ledger_lacks_is_missing_once_and_duplicate_once() -> None:
    rows = [row(2, "o", "p", 100, 0), row(3, "o", "p", 100, 0)]
    report = reconcile.match(rows, {}, WHOLE_DAY)
    assert kinds(report) == [(MISSING_IN_LEDGER, "o"), (DUPLICATE, "o")]


def test_refunded_captures_are_owed_nothing_listed_or_not() -> None:
    captures = {
        "listed": cap("listed", "p1", 100, 0, refunded=True),
        "unlisted": cap("unlisted", "p2", 200, 1, refunded=True),
    }
    report = reconcile.match([row(2, "listed", "p1", 100, 0)], captures, WHOLE_DAY)
    assert kinds(report) == [(REFUNDED_IN_BILL, "listed")]
    assert (report.bill_total_fen, report.ledger_total_fen) == (100, 0)


def test_only_captures_of_the_period_are_missing_in_the_bill() -> None:
    within = Period(at(0), at(60))
    captures = {
        "start": cap("start", "p", 1, 0),
        "inside": cap("inside", "p", 10, 59),
        "end": cap("end", "p", 100, 60),  # the end is excluded
        "before": cap("before", "p", 1000, -1),
    }
    report = reconcile.match([row(2, "listed", "p", 5, 10)], captures, within)
    assert kinds(report) == [
        (MISSING_IN_LEDGER, "listed"),
        (MISSING_IN_BILL, "start"),
        (MISSING_IN_BILL, "inside"),
    ]
    assert report.ledger_total_fen == 11


def test_a_platforms_bill_misses_only_that_platforms_captures() -> None:
    captures = {
        "jd-listed": Capture("jd-listed", "p", 1, at(0), platform_id="jd"),
        "jd-unlisted": Capture("jd-unlisted", "p", 10, at(1), platform_id="jd"),
        "tb-unlisted": Capture("tb-unlisted", "p", 100, at(2), platform_id="taobao"),
        "tb-listed": Capture("tb-listed", "p", 1000, at(3), platform_id="taobao"),
    }
    rows = [row(2, "jd-listed", "p", 1, 0), row(3, "tb-listed", "p", 1000, 3)]
    jd = reconcile.match(rows, captures, WHOLE_DAY, platform_id="jd")
    assert kinds(jd) == [(MISSING_IN_BILL, "jd-unlisted")]  # a listed order matches anyway
    assert (jd.ledger_total_fen, jd.platform_id) == (1_011, "jd")
    every = reconcile.match(rows, captures, WHOLE_DAY)
    assert kinds(every) == [(MISSING_IN_BILL, "jd-unlisted"), (MISSING_IN_BILL, "tb-unlisted")]
    [event] = reconcile.record(None, reconcile.Reconcile("ef" * 32, 1, jd))
    assert isinstance(event, ev.DiscountBillReconciled) and event.platform_id == "jd"
    state = reconcile.evolve(None, event)
    assert state is not None and state.platform_id == "jd"
    assert reconcile.record(state, reconcile.Reconcile("ef" * 32, 1, every)) == []  # none asked
    with pytest.raises(AlreadyExists):
        reconcile.same_request(state, None, "taobao")


def test_a_listed_capture_outside_the_period_is_still_matched() -> None:
    report = reconcile.match(
        [row(2, "o", "p", 7, 0)], {"o": cap("o", "p", 7, 500)}, Period(at(0), at(1))
    )
    assert report.discrepancies == () and report.totals[MATCHED] == Totals(1, 7, 7)


def test_the_report_is_the_same_whatever_order_the_captures_come_in() -> None:
    rows = [row(2, "a", "p", 1, 0)]
    captures = [cap(f"c{i}", "p", i + 1, i % 7) for i in range(20)]
    one = reconcile.match(rows, {c.order_id: c for c in captures}, WHOLE_DAY)
    other = reconcile.match(rows, {c.order_id: c for c in reversed(captures)}, WHOLE_DAY)
    assert one == other
    assert reconcile.lines_sha256(one.discrepancies) == reconcile.lines_sha256(other.discrepancies)
    missing = [d.captured_at for d in one.discrepancies if d.kind == MISSING_IN_BILL]
    assert missing == sorted(at for at in missing if at is not None)


def test_the_lines_digest_changes_with_any_line() -> None:
    report = reconcile.match([row(2, "o", "p", 100, 0)], {"o": cap("o", "p", 99, 0)}, WHOLE_DAY)
    other = reconcile.match([row(2, "o", "p", 100, 0)], {"o": cap("o", "p", 98, 0)}, WHOLE_DAY)
    assert reconcile.lines_sha256(report.discrepancies) != reconcile.lines_sha256(
        other.discrepancies
    )
    assert reconcile.lines_sha256(()) == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


orders = st.sampled_from([f"o-{i}" for i in range(12)])
refs = st.sampled_from(["pay-1", "pay-2"])
fens = st.integers(1, 3)
minutes = st.integers(-30, 90)


@given(
    st.lists(st.tuples(orders, refs, fens, minutes), max_size=25),
    st.dictionaries(orders, st.tuples(refs, fens, minutes, st.booleans()), max_size=12),
)
def test_every_row_and_every_owed_capture_is_counted_once_to_the_fen(
    bill_rows: list[tuple[str, str, int, int]],
    ledger: dict[str, tuple[str, int, int, bool]],
) -> None:
    rows = [row(i + 2, o, r, f, m) for i, (o, r, f, m) in enumerate(bill_rows)]
    captures = {o: cap(o, r, f, m, refunded) for o, (r, f, m, refunded) in ledger.items()}
    within = Period(at(0), at(60))
    report = reconcile.match(rows, captures, within)  # checks its own sums (Report.check)
    listed = {r.order_id for r in rows}
    owed = [
        c
        for c in captures.values()
        if not c.refunded and (c.order_id in listed or c.captured_at in within)
    ]
    assert report.bill_total_fen == sum(r.discount_fen for r in rows)
    assert report.ledger_total_fen == sum(c.subsidy_fen for c in owed)
    assert sum(report.totals[k].count for k in KINDS if k != MISSING_IN_BILL) == len(rows)
    assert report.totals[DUPLICATE].count == len(rows) - len(listed)
    assert report.totals[MATCHED].count == sum(
        1
        for o in listed
        if o in captures
        and not captures[o].refunded
        and (captures[o].subsidy_fen, captures[o].payment_ref)
        == next((r.discount_fen, r.payment_ref) for r in rows if r.order_id == o)
    )
    assert {d.order_id for d in report.discrepancies if d.kind == MISSING_IN_BILL} == {
        c.order_id for c in owed if c.order_id not in listed
    }


# --------------------------------------------------------------------------------------------
# what is recorded


def test_the_first_reconciliation_of_a_file_is_recorded_with_counts_and_totals_only() -> None:
    rows = [row(2, "o-1", "p", 100, 0), row(3, "o-2", "p", 50, 1)]
    report = reconcile.match(rows, {"o-1": cap("o-1", "p", 90, 0)}, WHOLE_DAY)
    [event] = reconcile.record(None, reconcile.Reconcile("ab" * 32, 321, report))
    assert isinstance(event, ev.DiscountBillReconciled)
    assert (event.file_sha256, event.file_bytes, event.rows, event.discrepancies) == (
        "ab" * 32,
        321,
        2,
        2,
    )
    assert (event.amount_mismatch.count, event.amount_mismatch.bill_fen) == (1, 100)
    assert (event.amount_mismatch.ledger_fen, event.missing_in_ledger.bill_fen) == (90, 50)
    assert (event.bill_total_fen, event.ledger_total_fen) == (150, 90)
    assert event.lines_sha256 == reconcile.lines_sha256(report.discrepancies)
    assert reconcile.totals_of(event) == dict(report.totals)
    # No order id, payment reference or amount of a single order in the event.
    wire = event.SerializeToString()
    assert b"o-1" not in wire and b"o-2" not in wire
    state = reconcile.evolve(None, event)
    assert state == reconcile.Reconciled("ab" * 32, WHOLE_DAY)


def test_the_same_file_again_records_nothing_unless_asked_for_another_period() -> None:
    report = reconcile.match([row(2, "o", "p", 1, 0)], {}, WHOLE_DAY)
    [event] = reconcile.record(None, reconcile.Reconcile("cd" * 32, 10, report))
    state = reconcile.evolve(None, event)
    assert reconcile.record(state, reconcile.Reconcile("cd" * 32, 10, report)) == []
    derived = reconcile.match([row(2, "o", "p", 1, 0)], {}, Period(at(0), at(1), given=False))
    assert reconcile.record(state, reconcile.Reconcile("cd" * 32, 10, derived)) == []
    other = reconcile.match([row(2, "o", "p", 1, 0)], {}, Period(at(0), at(5)))
    with pytest.raises(AlreadyExists) as err:
        reconcile.record(state, reconcile.Reconcile("cd" * 32, 10, other))
    assert (err.value.reason, err.value.field) == ("BILL_ALREADY_RECONCILED", "period_from")
