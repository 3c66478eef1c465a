"""Settlement decisions, pure: evidence, merchant batches, clawbacks. No I/O, no clock.

Settlement pays a merchant for its **evidenced, unrefunded captures** (delivery or activation
evidence recorded), in batches per period made by an operator and approved by a different
approver (maker-checker); an approved batch never changes. A refund of an order a batch
included becomes a **clawback**: the merchant owes that subsidy back, deducted from its next
batch (whole, oldest first, while the batch's gross covers it), and a receivable until one does.
So every fen paid to a merchant is an evidenced, unrefunded capture's or a recorded clawback's
(``paid_fen == unrefunded_fen + clawed_fen - deducted_fen`` per merchant; see the property test).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from google.protobuf.message import Message

from services.invariants import InvariantViolation, MerchantSettled
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import events_pb2 as ev

COURIER, ACTIVATION = "COURIER", "ACTIVATION"
EVIDENCE_KINDS = (COURIER, ACTIVATION)
CREATED, APPROVED, PAID = "CREATED", "APPROVED", "PAID"


@dataclass(frozen=True)
class Evidence:
    kind: str
    reference: str
    serial: str = ""


@dataclass(frozen=True)
class Capture:
    """A captured order as settlement sees it."""

    order_id: str
    merchant_id: str
    subsidy_fen: int
    captured_at: dt.datetime
    serial: str = ""  # the unit's serial / IMEI the order reserved ("" for none)
    refunded: bool = False
    evidence: Evidence | None = None
    batch_id: str = ""  # the batch that included it ("" for none yet)


@dataclass(frozen=True)
class Clawback:
    order_id: str
    merchant_id: str
    fen: int
    batch_id: str  # the batch that included the refunded order
    deducted_by: str = ""  # the batch that deducted it ("" for outstanding: a receivable)


@dataclass(frozen=True)
class Batch:
    batch_id: str
    merchant_id: str
    status: str
    created_by: str
    net_fen: int
    orders: tuple[str, ...] = ()
    clawbacks: tuple[str, ...] = ()
    payment_ref: str = ""


# --------------------------------------------------------------------------------------------
# Evidence


@dataclass(frozen=True)
class RecordEvidence:
    order_id: str
    kind: str
    reference: str
    serial: str = ""
    evidenced_at: dt.datetime | None = None


def record_evidence(capture: Capture | None, cmd: RecordEvidence) -> list[Message]:
    """Record a captured order's delivery (courier waybill) or activation record. A unit
    reserved with a serial / IMEI is evidenced by its activation only, of that very unit. The
    same evidence again records nothing; different evidence for an evidenced order is refused."""
    if capture is None:
        raise NotFound(
            "UNKNOWN_ORDER", f"order_id: no captured order {cmd.order_id!r}", field="order_id"
        )
    if cmd.kind not in EVIDENCE_KINDS:
        raise InvalidArgument("INVALID_KIND", "kind: COURIER or ACTIVATION", field="kind")
    evidence = Evidence(cmd.kind, cmd.reference, cmd.serial)
    if capture.evidence is not None:
        if capture.evidence == evidence:
            return []
        raise AlreadyExists(
            "EVIDENCE_RECORDED",
            f"order_id: order {capture.order_id} already has its evidence",
            field="order_id",
        )
    if capture.refunded:
        raise FailedPrecondition(
            "ORDER_REFUNDED", f"order_id: order {capture.order_id} was refunded", field="order_id"
        )
    if capture.serial:
        if cmd.kind != ACTIVATION:
            raise FailedPrecondition(
                "ACTIVATION_REQUIRED",
                "kind: a unit reserved with a serial is evidenced by its activation record",
                field="kind",
            )
        if cmd.serial != capture.serial:
            raise FailedPrecondition(
                "SERIAL_MISMATCH",
                "serial: the activated unit is not the one the order reserved",
                field="serial",
            )
    elif cmd.serial:
        raise InvalidArgument(
            "UNEXPECTED_SERIAL", "serial: the order reserved no serial", field="serial"
        )
    recorded = ev.EvidenceRecorded(
        order_id=capture.order_id,
        merchant_id=capture.merchant_id,
        kind=cmd.kind,
        reference=cmd.reference,
        serial=cmd.serial,
    )
    if cmd.evidenced_at is not None:
        recorded.evidenced_at.FromDatetime(cmd.evidenced_at.astimezone(dt.UTC))
    return [recorded]


def overdue(captures: Iterable[Capture], now: dt.datetime, days: int) -> list[Capture]:
    """The unrefunded captures still without evidence ``days`` after their capture (by capture
    time, then order id)."""
    limit = dt.timedelta(days=days)
    late = [
        c
        for c in captures
        if c.evidence is None and not c.refunded and now - c.captured_at >= limit
    ]
    return sorted(late, key=lambda c: (c.captured_at, c.order_id))


# Where a listing of captures stopped: the (capture time, order id) of the last one examined;
# the next page starts after it. Opaque to callers: "<microseconds since 1970>~<order id>".
Cursor = tuple[dt.datetime, str]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def page_token(cursor: Cursor | None) -> str:
    """The page token of ``cursor`` ("" when the listing is complete)."""
    if cursor is None:
        return ""
    at, order_id = cursor
    micros = (at - _EPOCH) // dt.timedelta(microseconds=1)
    return f"{micros}~{order_id}"


def cursor_of(token: str) -> Cursor | None:
    """The cursor a page token names (None for the first page); anything but a token this
    ledger gave is INVALID_PAGE_TOKEN."""
    if not token:
        return None
    micros, sep, order_id = token.partition("~")
    if not (
        sep
        and micros.isascii()
        and micros.isdigit()
        and len(micros) <= 18
        and 0 < len(order_id) <= 64  # what an order id (or an item's line) is stored in
    ):
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token: from a previous answer", field="page_token"
        )
    return _EPOCH + dt.timedelta(microseconds=int(micros)), order_id


def overdue_page(
    scanned: Sequence[tuple[Capture, int]], now: dt.datetime, limit: int, complete: bool
) -> tuple[list[Capture], Cursor | None]:
    """One page of overdue captures from ``scanned`` (unevidenced captures in (time, order)
    order, each with its policy version's evidence days), at most ``limit``; and where the
    next page starts: after the last one returned when more overdue ones were scanned, after
    the last one scanned when the scan stopped short of the end (``complete`` false), None
    when nothing is left (so a last page that is full has no empty page after it)."""
    late = [c for c, days in scanned if overdue([c], now, days)]
    if len(late) > limit:
        last = late[limit - 1]
        return late[:limit], (last.captured_at, last.order_id)
    if complete or not scanned:
        return late, None
    end = scanned[-1][0]
    return late, (end.captured_at, end.order_id)


# --------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class CreateBatch:
    batch_id: str
    merchant_id: str
    period_from: dt.datetime
    period_to: dt.datetime


def payable(c: Capture, merchant_id: str, start: dt.datetime, end: dt.datetime) -> bool:
    """Whether a batch of ``merchant_id`` for [start, end) pays capture ``c``."""
    return (
        c.merchant_id == merchant_id
        and not c.batch_id
        and not c.refunded
        and c.evidence is not None
        and start <= c.captured_at < end
    )


def create_batch(
    existing: Batch | None,
    captures: Iterable[Capture],
    clawbacks: Iterable[Clawback],
    cmd: CreateBatch,
) -> list[Message]:
    """A merchant's batch for a period: its evidenced, unrefunded captures not paid by another
    batch, less its outstanding clawbacks (whole, oldest first, while the gross covers them).
    Nothing is owed until a different person approves it. The same batch id again is refused."""
    if existing is not None:
        raise AlreadyExists(
            "BATCH_EXISTS", f"batch_id: batch {cmd.batch_id} exists", field="batch_id"
        )
    if cmd.period_to <= cmd.period_from:
        raise InvalidArgument(
            "INVALID_PERIOD", "period_to: must be after period_from", field="period_to"
        )
    lines = sorted(
        (c for c in captures if payable(c, cmd.merchant_id, cmd.period_from, cmd.period_to)),
        key=lambda c: (c.captured_at, c.order_id),
    )
    gross = sum(c.subsidy_fen for c in lines)
    deducted: list[Clawback] = []
    left = gross
    for claw in clawbacks:  # in the order they were recorded
        if claw.merchant_id == cmd.merchant_id and not claw.deducted_by and claw.fen <= left:
            deducted.append(claw)
            left -= claw.fen
    if not lines and not deducted:
        raise FailedPrecondition(
            "NOTHING_TO_SETTLE",
            f"merchant_id: merchant {cmd.merchant_id} has no evidenced, unsettled capture"
            " in the period",
            field="merchant_id",
        )
    created = ev.SettlementBatchCreated(
        batch_id=cmd.batch_id,
        merchant_id=cmd.merchant_id,
        lines=[ev.SettlementLine(order_id=c.order_id, subsidy_fen=c.subsidy_fen) for c in lines],
        clawbacks=[ev.ClawbackLine(order_id=c.order_id, fen=c.fen) for c in deducted],
        gross_fen=gross,
        clawback_fen=gross - left,
        net_fen=left,
    )
    created.period_from.FromDatetime(cmd.period_from.astimezone(dt.UTC))
    created.period_to.FromDatetime(cmd.period_to.astimezone(dt.UTC))
    return [created]


def unknown_batch(batch_id: str) -> NotFound:
    return NotFound("UNKNOWN_BATCH", f"batch_id: no batch {batch_id!r}", field="batch_id")


def approve_batch(batch: Batch | None, batch_id: str, approver: str) -> list[Message]:
    """A different approver approves the batch: from now on it never changes. Approving it
    again records nothing."""
    if batch is None:
        raise unknown_batch(batch_id)
    if batch.status != CREATED:
        return []
    if approver == batch.created_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "batch_id: the approver must be a different person from its maker",
            field="batch_id",
        )
    return [
        ev.SettlementBatchApproved(
            batch_id=batch.batch_id, merchant_id=batch.merchant_id, net_fen=batch.net_fen
        )
    ]


def mark_paid(batch: Batch | None, batch_id: str, payment_ref: str) -> list[Message]:
    """An approved batch was paid by the transfer ``payment_ref``; the same reference again
    records nothing, another is refused."""
    if batch is None:
        raise unknown_batch(batch_id)
    if batch.status == PAID:
        if batch.payment_ref == payment_ref:
            return []
        raise AlreadyExists(
            "BATCH_PAID",
            f"batch_id: batch {batch_id} was paid by another transfer",
            field="batch_id",
        )
    if batch.status != APPROVED:
        raise FailedPrecondition(
            "BATCH_NOT_APPROVED", f"batch_id: batch {batch_id} is not approved", field="batch_id"
        )
    return [
        ev.SettlementBatchPaid(
            batch_id=batch.batch_id,
            merchant_id=batch.merchant_id,
            net_fen=batch.net_fen,
            payment_ref=payment_ref,
        )
    ]


def clawback(capture: Capture | None) -> list[Message]:
    """A refund of an order a batch included (approved or not: its money is committed the
    moment the batch exists) is a clawback of its subsidy; of any other order, nothing."""
    if capture is None or not capture.batch_id:
        return []
    return [
        ev.ClawbackRecorded(
            order_id=capture.order_id,
            merchant_id=capture.merchant_id,
            fen=capture.subsidy_fen,
            batch_id=capture.batch_id,
        )
    ]


# --------------------------------------------------------------------------------------------
# Folds: the one place settlement state changes


def evolve_capture(capture: Capture | None, event: Message) -> Capture | None:
    """A captured order after ``event`` (the capture itself is built by the caller, who knows
    its merchant, serial and time)."""
    if capture is None:
        return None
    if isinstance(event, ev.EvidenceRecorded) and event.order_id == capture.order_id:
        return replace(capture, evidence=Evidence(event.kind, event.reference, event.serial))
    if isinstance(event, ev.SubsidyReleased) and event.order_id == capture.order_id:
        return replace(capture, refunded=True)
    if isinstance(event, ev.SettlementBatchCreated) and any(
        line.order_id == capture.order_id for line in event.lines
    ):
        return replace(capture, batch_id=event.batch_id)
    return capture


def evolve_batch(batch: Batch | None, event: Message, actor_id: str) -> Batch | None:
    """A batch after ``event``."""
    if isinstance(event, ev.SettlementBatchCreated):
        return Batch(
            event.batch_id,
            event.merchant_id,
            CREATED,
            actor_id,
            event.net_fen,
            tuple(line.order_id for line in event.lines),
            tuple(c.order_id for c in event.clawbacks),
        )
    if batch is None:
        return None
    if isinstance(event, ev.SettlementBatchApproved):
        return replace(batch, status=APPROVED)
    if isinstance(event, ev.SettlementBatchPaid):
        return replace(batch, status=PAID, payment_ref=event.payment_ref)
    return batch


def evolve_clawbacks(clawbacks: list[Clawback], event: Message) -> list[Clawback]:
    """The clawbacks after ``event``, in the order they were recorded."""
    if isinstance(event, ev.ClawbackRecorded):
        return [*clawbacks, Clawback(event.order_id, event.merchant_id, event.fen, event.batch_id)]
    if isinstance(event, ev.SettlementBatchCreated):
        taken = {c.order_id for c in event.clawbacks}
        return [
            replace(c, deducted_by=event.batch_id)
            if c.order_id in taken and not c.deducted_by
            else c
            for c in clawbacks
        ]
    return clawbacks


# --------------------------------------------------------------------------------------------
# The settlement ledger rebuilt from events alone (what the invariant checks)


@dataclass
class _Book:
    merchant: dict[str, str]  # batch -> merchant
    lines: dict[str, dict[str, int]]  # batch -> order -> fen
    deducted: dict[str, dict[str, int]]  # batch -> order -> fen
    net: dict[str, int]
    paid: set[str]
    refunded: set[str]
    clawed: dict[str, int]  # order -> fen


def settled(events: Iterable[Message]) -> dict[str, MerchantSettled]:
    """Per merchant, what its settlement events add up to (paid batches only), for
    :func:`services.invariants.check_paid_covered`. Raises InvariantViolation when an order is
    in two batches, a clawback is recorded or deducted twice, or a refund of a batched order
    has no clawback."""
    book = _Book({}, {}, {}, {}, set(), set(), {})
    for event in events:
        if isinstance(event, ev.SettlementBatchCreated):
            batched = {o for lines in book.lines.values() for o in lines}
            taken = {o for d in book.deducted.values() for o in d}
            for line in event.lines:
                if line.order_id in batched:
                    raise InvariantViolation(f"order {line.order_id} in two batches")
            for c in event.clawbacks:
                if c.order_id in taken or book.clawed.get(c.order_id) != c.fen:
                    raise InvariantViolation(f"clawback of {c.order_id} deducted wrongly")
            book.merchant[event.batch_id] = event.merchant_id
            book.lines[event.batch_id] = {x.order_id: x.subsidy_fen for x in event.lines}
            book.deducted[event.batch_id] = {c.order_id: c.fen for c in event.clawbacks}
            book.net[event.batch_id] = event.net_fen
        elif isinstance(event, ev.SettlementBatchPaid):
            book.paid.add(event.batch_id)
        elif isinstance(event, ev.SubsidyReleased) and event.was_captured:
            book.refunded.add(event.order_id)
        elif isinstance(event, ev.ClawbackRecorded):
            if event.order_id in book.clawed:
                raise InvariantViolation(f"two clawbacks of order {event.order_id}")
            book.clawed[event.order_id] = event.fen
    batched = {o for lines in book.lines.values() for o in lines}
    if missing := (batched & book.refunded) - book.clawed.keys():
        raise InvariantViolation(f"refunds of batched orders without a clawback: {missing}")
    out: dict[str, MerchantSettled] = {}
    for batch_id in sorted(book.paid):
        lines = book.lines[batch_id]
        before = out.get(book.merchant[batch_id], MerchantSettled(0, 0, 0, 0))
        out[book.merchant[batch_id]] = MerchantSettled(
            before.paid + book.net[batch_id],
            before.unrefunded + sum(f for o, f in lines.items() if o not in book.refunded),
            before.clawed + sum(book.clawed[o] for o in lines if o in book.refunded),
            before.deducted + sum(book.deducted[batch_id].values()),
        )
    return out
