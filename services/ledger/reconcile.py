"""Discount-bill reconciliation (立减账单核对), pure: read the payment provider's bill, match it
against the ledger's captures, decide what is recorded. No I/O, no clock.

The bill is UTF-8 CSV (a byte-order mark is fine) with exactly the header
``order_id,payment_ref,discount_fen,paid_at``: one row per discount the provider granted at
payment. Every row is checked at the edge (:func:`read_bill`); a bill with any malformed row is
answered with every bad line (and column) and nothing is recorded.

Matching (:func:`match`), by ``order_id``, gives each row and each capture one kind:

- ``MATCHED``: captured, not refunded, same discount and payment reference;
- ``AMOUNT_MISMATCH``: captured, not refunded, a different discount (whatever the references);
- ``PAYMENT_REF_MISMATCH``: same discount, a different payment reference;
- ``MISSING_IN_LEDGER``: the bill lists an order the ledger has no capture of (never reserved,
  still pending, cancelled or expired: the row says which);
- ``REFUNDED_IN_BILL``: the bill lists an order whose capture was refunded: no discount is owed
  for it (the provider's bill of the payment day still lists it; the refund is the ledger's);
- ``MISSING_IN_BILL``: a capture, not refunded, made within the bill's period (and, for one
  platform's bill, by that platform), that the bill does not list (a refunded capture is owed
  nothing, so it is not missing);
- ``DUPLICATE``: a second row of an order already listed higher up; only the first row of an
  order is matched.

Totals are exact in fen: ``bill_total_fen`` is the sum of every row (duplicates included, as the
provider adds them up) and ``ledger_total_fen`` the sum of the unrefunded captures the bill is
compared with (those it lists and those of its period); each is the sum of its side over the
kinds, which :meth:`Report.check` asserts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.invariants import InvariantViolation
from services.kernel import validate
from services.kernel.errors import AlreadyExists, DomainError, InvalidArgument
from subsidy.v1 import events_pb2 as ev

HEADER: Final = ("order_id", "payment_ref", "discount_fen", "paid_at")
# 100,000 rows of the header's columns are about 10 MB; the bill arrives in chunks (gRPC
# messages stay under their 4 MiB limit), so these bound memory and time, not the transport.
MAX_BILL_BYTES: Final = 32 * 1024 * 1024
MAX_BILL_ROWS: Final = 200_000
MAX_ORDER_ID: Final = 64  # the ledger's order ids (ReserveSubsidy)
MAX_PAYMENT_REF: Final = 128  # the ledger's payment references (CaptureSubsidy)
MAX_PAID_AT: Final = 40
MAX_DISCOUNT_FEN: Final = 10**10  # a hundred million yuan for one order is a typo, not a discount
MAX_LISTED_ERRORS: Final = 1000  # a bill of bad rows is answered with the first ones and a count

MATCHED: Final = "MATCHED"
AMOUNT_MISMATCH: Final = "AMOUNT_MISMATCH"
PAYMENT_REF_MISMATCH: Final = "PAYMENT_REF_MISMATCH"
MISSING_IN_BILL: Final = "MISSING_IN_BILL"
MISSING_IN_LEDGER: Final = "MISSING_IN_LEDGER"
REFUNDED_IN_BILL: Final = "REFUNDED_IN_BILL"
DUPLICATE: Final = "DUPLICATE"
# The report's order: what costs money first.
KINDS: Final = (
    MATCHED,
    AMOUNT_MISMATCH,
    MISSING_IN_LEDGER,
    MISSING_IN_BILL,
    PAYMENT_REF_MISMATCH,
    REFUNDED_IN_BILL,
    DUPLICATE,
)
DISCREPANCIES: Final = KINDS[1:]

_FEN_RE: Final = re.compile(r"[0-9]{1,11}")


# --------------------------------------------------------------------------------------------
# The bill


@dataclass(frozen=True)
class BillRow:
    line: int  # the row's line in the file (the header is line 1)
    order_id: str
    payment_ref: str
    discount_fen: int
    paid_at: datetime  # aware, UTC


@dataclass(frozen=True)
class RowError:
    line: int
    column: str  # the header's name of the bad cell; "" for the row as a whole
    reason: str
    message: str


@dataclass
class ParsedBill:
    """The bill's rows, and every problem found in them (then nothing may be applied)."""

    rows: list[BillRow] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    bad_rows: int = 0

    @property
    def total_rows(self) -> int:
        return len(self.rows) + self.bad_rows


def file_sha256(data: bytes) -> str:
    """The bill's identity: re-importing the same bytes is the same reconciliation."""
    return hashlib.sha256(data).hexdigest()


def _file_error(reason: str, message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(reason, f"csv: {message}", field="csv", **metadata)


def _decode(data: bytes) -> str:
    if len(data) > MAX_BILL_BYTES:
        raise _file_error("BILL_TOO_LARGE", f"at most {MAX_BILL_BYTES} bytes; split the bill")
    if not data.strip():
        raise _file_error("EMPTY_BILL", "the file is empty")
    try:
        body = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _file_error("INVALID_ENCODING", f"line {line} is not UTF-8", line=str(line)) from None
    if "\x00" in body:
        line = body[: body.index("\x00")].count("\n") + 1
        raise _file_error("MALFORMED_CSV", f"line {line}: NUL byte", line=str(line))
    return body


def paid_at(value: str) -> datetime:
    """An ISO 8601 instant with its UTC offset (``2025-06-01T10:15:00+08:00``, or ``Z``), in
    UTC. A time without an offset is refused: the bill's period must not depend on a guess."""
    if not value or len(value) > MAX_PAID_AT:
        raise InvalidArgument(
            "INVALID_TIME", "paid_at: an ISO 8601 time with offset is required", field="paid_at"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in value.upper():
        raise InvalidArgument(
            "INVALID_TIME",
            "paid_at: an ISO 8601 date and time with its UTC offset,"
            " e.g. 2025-06-01T10:15:00+08:00",
            field="paid_at",
        )
    return parsed.astimezone(UTC)


def discount_fen(value: str) -> int:
    """A whole, positive number of fen."""
    if not _FEN_RE.fullmatch(value) or not 0 < int(value) <= MAX_DISCOUNT_FEN:
        raise InvalidArgument(
            "INVALID_AMOUNT",
            f"discount_fen: a whole number of fen, 1..{MAX_DISCOUNT_FEN}",
            field="discount_fen",
        )
    return int(value)


def _row(line: int, cells: list[str]) -> BillRow:
    order_id, payment_ref, fen, at = (c.strip() for c in cells)
    return BillRow(
        line=line,
        order_id=validate.identifier("order_id", order_id, max_len=MAX_ORDER_ID),
        payment_ref=validate.text_field("payment_ref", payment_ref, max_len=MAX_PAYMENT_REF),
        discount_fen=discount_fen(fen),
        paid_at=paid_at(at),
    )


def read_bill(data: bytes) -> ParsedBill:
    """Every row of the bill, checked. Whole-file faults (size, encoding, header, too many rows,
    broken quoting) raise ``InvalidArgument``; faults of rows are collected, with their line and
    column, up to :data:`MAX_LISTED_ERRORS` listed (``bad_rows`` counts them all)."""
    reader = csv.reader(io.StringIO(_decode(data), newline=""), strict=True)
    parsed = ParsedBill()
    line = 1
    try:
        header = next(reader, None)
        if header is None or tuple(c.strip() for c in header) != HEADER:
            raise _file_error(
                "WRONG_HEADER", f"line 1: the header must be exactly {','.join(HEADER)}", line="1"
            )
        line = reader.line_num + 1
        for cells in reader:
            if cells:  # an empty line (a trailing newline) is not a row
                if parsed.total_rows >= MAX_BILL_ROWS:
                    raise _file_error(
                        "TOO_MANY_ROWS", f"at most {MAX_BILL_ROWS} rows; split the bill"
                    )
                _add(parsed, line, cells)
            line = reader.line_num + 1
    except csv.Error as exc:
        raise _file_error("MALFORMED_CSV", f"line {line}: {exc}", line=str(line)) from None
    if parsed.total_rows == 0:
        raise _file_error("EMPTY_BILL", "the bill has a header but no rows")
    return parsed


def _add(parsed: ParsedBill, line: int, cells: list[str]) -> None:
    try:
        if len(cells) != len(HEADER):
            raise InvalidArgument(
                "WRONG_COLUMN_COUNT", f"{len(cells)} cells, the header has {len(HEADER)}"
            )
        parsed.rows.append(_row(line, cells))
    except DomainError as err:
        parsed.bad_rows += 1
        if len(parsed.errors) < MAX_LISTED_ERRORS:
            parsed.errors.append(RowError(line, err.field, err.reason, err.message))


# --------------------------------------------------------------------------------------------
# The ledger's side, the period, the matching


@dataclass(frozen=True)
class Capture:
    """A captured subsidy as the bill should show it."""

    order_id: str
    payment_ref: str
    subsidy_fen: int
    captured_at: datetime
    refunded: bool = False
    platform_id: str = ""  # the platform whose checkout captured it


def order_capture(items: Sequence[Capture]) -> Capture:
    """One order as the bill lists it, from its captures (one, or one per item of a multi-item
    order, in item order): the discount of all its items, the first's payment reference and
    time; refunded only when every item was (a partly refunded order is still owed the
    discount of its payment in the bill; the refunded items are in the returns ledger)."""
    first = items[0]
    return replace(
        first,
        subsidy_fen=sum(c.subsidy_fen for c in items),
        captured_at=min(c.captured_at for c in items),
        refunded=all(c.refunded for c in items),
    )


@dataclass(frozen=True)
class Period:
    """The captures a bill must list: those made from ``start`` (included) to ``end``
    (excluded). ``given``: the operator's; otherwise the bill's first to last payment."""

    start: datetime
    end: datetime
    given: bool = True

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end


def period(rows: Sequence[BillRow], start: datetime | None, end: datetime | None) -> Period:
    """The operator's period (both ends, or neither), else the bill's first paid_at to its last
    (that last instant included)."""
    if (start is None) != (end is None):
        raise InvalidArgument(
            "INVALID_PERIOD", "period: give both from and to, or neither", field="period_from"
        )
    if start is not None and end is not None:
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidArgument(
                "INVALID_PERIOD", "period: times with their UTC offset", field="period_from"
            )
        if not start < end:
            raise InvalidArgument(
                "INVALID_PERIOD", "period: from must be before to", field="period_to"
            )
        return Period(start.astimezone(UTC), end.astimezone(UTC), given=True)
    times = [r.paid_at for r in rows]
    return Period(min(times), max(times) + timedelta(microseconds=1), given=False)


@dataclass(frozen=True)
class Discrepancy:
    """One line of the report: a bill row or a capture that did not match."""

    kind: str
    line: int  # the bill's line; 0 for a capture the bill does not list
    order_id: str
    bill_payment_ref: str = ""
    ledger_payment_ref: str = ""
    bill_fen: int = 0
    ledger_fen: int = 0
    paid_at: datetime | None = None
    captured_at: datetime | None = None
    ledger_status: str = ""  # CAPTURED, REFUNDED, or the reservation's status, "" for none
    first_line: int = 0  # a duplicate: the line the order is first listed on

    @property
    def difference_fen(self) -> int:
        return self.bill_fen - self.ledger_fen

    def canonical(self) -> list[object]:
        """The line as plain values, for the report's digest (the same on every platform)."""
        return [
            self.kind,
            self.line,
            self.order_id,
            self.bill_payment_ref,
            self.ledger_payment_ref,
            self.bill_fen,
            self.ledger_fen,
            _iso(self.paid_at),
            _iso(self.captured_at),
            self.ledger_status,
            self.first_line,
        ]


def _iso(at: datetime | None) -> str:
    return at.astimezone(UTC).isoformat() if at is not None else ""


@dataclass(frozen=True)
class Totals:
    count: int = 0
    bill_fen: int = 0
    ledger_fen: int = 0

    def plus(self, bill_fen: int, ledger_fen: int) -> Totals:
        return Totals(self.count + 1, self.bill_fen + bill_fen, self.ledger_fen + ledger_fen)


@dataclass(frozen=True)
class Report:
    rows: int
    period: Period
    platform_id: str  # the one platform whose captures the bill must list; "" every platform
    totals: Mapping[str, Totals]
    discrepancies: tuple[Discrepancy, ...]
    bill_total_fen: int
    ledger_total_fen: int

    def check(self) -> None:
        """Each side's total is the sum of its side over the kinds, every row has one kind,
        and the lines are the counted discrepancies: the report adds up to the fen."""
        by_side = (
            sum(t.bill_fen for t in self.totals.values()),
            sum(t.ledger_fen for t in self.totals.values()),
        )
        if by_side != (self.bill_total_fen, self.ledger_total_fen):
            raise InvariantViolation(
                f"reconciliation: totals {self.bill_total_fen} / {self.ledger_total_fen} fen"
                f" != the kinds' {by_side[0]} / {by_side[1]} fen"
            )
        rows = sum(self.totals[k].count for k in KINDS if k != MISSING_IN_BILL)
        lines = sum(self.totals[k].count for k in DISCREPANCIES)
        if (rows, lines) != (self.rows, len(self.discrepancies)):
            raise InvariantViolation(
                f"reconciliation: {self.rows} rows, {len(self.discrepancies)} lines; the kinds"
                f" count {rows} rows, {lines} lines"
            )


def _of_row(
    kind: str,
    row: BillRow,
    cap: Capture | None = None,
    *,
    owed: int = 0,
    ledger_status: str = "",
    first_line: int = 0,
) -> Discrepancy:
    return Discrepancy(
        kind,
        row.line,
        row.order_id,
        bill_payment_ref=row.payment_ref,
        ledger_payment_ref=cap.payment_ref if cap is not None else "",
        bill_fen=row.discount_fen,
        ledger_fen=owed,
        paid_at=row.paid_at,
        captured_at=cap.captured_at if cap is not None else None,
        ledger_status=ledger_status,
        first_line=first_line,
    )


def _judge(row: BillRow, cap: Capture) -> Discrepancy:
    """A listed order the ledger captured: what the bill says beside what is owed."""
    if cap.refunded:  # nothing is owed for it any more
        return _of_row(REFUNDED_IN_BILL, row, cap, ledger_status="REFUNDED")
    if cap.subsidy_fen != row.discount_fen:
        kind = AMOUNT_MISMATCH
    elif cap.payment_ref != row.payment_ref:
        kind = PAYMENT_REF_MISMATCH
    else:
        kind = MATCHED
    return _of_row(kind, row, cap, owed=cap.subsidy_fen, ledger_status="CAPTURED")


def match(
    rows: Sequence[BillRow],
    captures: Mapping[str, Capture],
    within: Period,
    statuses: Mapping[str, str] | None = None,
    platform_id: str = "",
) -> Report:
    """Match the bill's rows against ``captures`` (by order id: at least every capture of an
    order the bill lists and every capture made ``within`` the period). ``statuses`` names what
    the ledger knows of an order it has no capture of (a pending or released reservation).
    ``platform_id``: the bill is one platform's (its payment provider's), so only that
    platform's captures of the period are missing from it; listed orders match whoever's."""
    statuses = statuses or {}
    first: dict[str, int] = {}
    judged: list[Discrepancy] = []
    for row in rows:
        if row.order_id in first:
            judged.append(_of_row(DUPLICATE, row, first_line=first[row.order_id]))
            continue
        first[row.order_id] = row.line
        cap = captures.get(row.order_id)
        if cap is None:
            status = statuses.get(row.order_id, "")
            judged.append(_of_row(MISSING_IN_LEDGER, row, ledger_status=status))
        else:
            judged.append(_judge(row, cap))
    for cap in sorted(captures.values(), key=lambda c: (c.captured_at, c.order_id)):
        if (
            cap.order_id not in first
            and not cap.refunded
            and cap.captured_at in within
            and (not platform_id or cap.platform_id == platform_id)
        ):
            judged.append(
                Discrepancy(
                    MISSING_IN_BILL,
                    0,
                    cap.order_id,
                    ledger_payment_ref=cap.payment_ref,
                    ledger_fen=cap.subsidy_fen,
                    captured_at=cap.captured_at,
                    ledger_status="CAPTURED",
                )
            )
    totals = dict.fromkeys(KINDS, Totals())
    for d in judged:
        totals[d.kind] = totals[d.kind].plus(d.bill_fen, d.ledger_fen)
    order = {kind: i for i, kind in enumerate(KINDS)}
    # Stable: bill lines stay in line order, captures the bill misses in time order.
    lines = sorted((d for d in judged if d.kind != MATCHED), key=lambda d: order[d.kind])
    report = Report(
        rows=len(rows),
        period=within,
        platform_id=platform_id,
        totals=totals,
        discrepancies=tuple(lines),
        bill_total_fen=sum(r.discount_fen for r in rows),
        ledger_total_fen=sum(t.ledger_fen for t in totals.values()),
    )
    report.check()
    return report


def lines_sha256(lines: Iterable[Discrepancy]) -> str:
    """SHA-256 of the report's lines, one canonical JSON array per line: recorded with the
    reconciliation, so the lines kept beside the log can be checked against it."""
    digest = hashlib.sha256()
    for d in lines:
        digest.update(json.dumps(d.canonical(), ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# What is recorded


@dataclass(frozen=True)
class Reconcile:
    """Record the reconciliation of one bill (idempotent on the file's SHA-256)."""

    file_sha256: str
    file_bytes: int
    report: Report


@dataclass(frozen=True)
class Reconciled:
    """A bill reconciled before: what its stream holds."""

    file_sha256: str
    period: Period
    platform_id: str = ""


def _ts(at: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def _totals(t: Totals) -> ev.BillDiscrepancyTotal:
    return ev.BillDiscrepancyTotal(count=t.count, bill_fen=t.bill_fen, ledger_fen=t.ledger_fen)


def same_request(existing: Reconciled, asked: Period | None, platform_id: str) -> None:
    """A bill is reconciled once: asking again for another period or platform is refused (the
    answer on record is for the ones it names); asking without them gets the recorded answer."""
    other_platform = bool(platform_id) and platform_id != existing.platform_id
    other_period = (
        asked is not None
        and asked.given
        and (asked.start, asked.end) != (existing.period.start, existing.period.end)
    )
    if other_platform or other_period:
        raise AlreadyExists(
            "BILL_ALREADY_RECONCILED",
            f"period_from: this bill was reconciled for {_iso(existing.period.start)} .."
            f" {_iso(existing.period.end)}, platform {existing.platform_id or 'all'}; a bill is"
            " reconciled once (a corrected bill is a new file)",
            field="period_from",
            file_sha256=existing.file_sha256,
        )


def record(existing: Reconciled | None, cmd: Reconcile) -> list[Message]:
    """The reconciliation's event, once per file: the same file again records nothing."""
    if existing is not None:
        same_request(existing, cmd.report.period, cmd.report.platform_id)
        return []
    r = cmd.report
    t = r.totals
    return [
        ev.DiscountBillReconciled(
            file_sha256=cmd.file_sha256,
            file_bytes=cmd.file_bytes,
            rows=r.rows,
            period_from=_ts(r.period.start),
            period_to=_ts(r.period.end),
            period_given=r.period.given,
            matched=_totals(t[MATCHED]),
            amount_mismatch=_totals(t[AMOUNT_MISMATCH]),
            payment_ref_mismatch=_totals(t[PAYMENT_REF_MISMATCH]),
            missing_in_bill=_totals(t[MISSING_IN_BILL]),
            missing_in_ledger=_totals(t[MISSING_IN_LEDGER]),
            refunded_in_bill=_totals(t[REFUNDED_IN_BILL]),
            duplicate=_totals(t[DUPLICATE]),
            bill_total_fen=r.bill_total_fen,
            ledger_total_fen=r.ledger_total_fen,
            lines_sha256=lines_sha256(r.discrepancies),
            discrepancies=len(r.discrepancies),
            platform_id=r.platform_id,
        )
    ]


def evolve(state: Reconciled | None, event: Message) -> Reconciled | None:
    """The bill's reconciliation after ``event``."""
    if isinstance(event, ev.DiscountBillReconciled):
        return Reconciled(
            event.file_sha256,
            Period(
                event.period_from.ToDatetime(tzinfo=UTC),
                event.period_to.ToDatetime(tzinfo=UTC),
                event.period_given,
            ),
            event.platform_id,
        )
    return state


def totals_of(event: ev.DiscountBillReconciled) -> dict[str, Totals]:
    """The recorded totals, by kind."""
    return {
        kind: Totals(m.count, m.bill_fen, m.ledger_fen)
        for kind, m in (
            (MATCHED, event.matched),
            (AMOUNT_MISMATCH, event.amount_mismatch),
            (PAYMENT_REF_MISMATCH, event.payment_ref_mismatch),
            (MISSING_IN_BILL, event.missing_in_bill),
            (MISSING_IN_LEDGER, event.missing_in_ledger),
            (REFUNDED_IN_BILL, event.refunded_in_bill),
            (DUPLICATE, event.duplicate),
        )
    }
