"""Settlement's pure decisions, case by case (the sequences are the property test's)."""

from __future__ import annotations

import datetime as dt

import pytest

from services.kernel.errors import DomainError
from services.ledger import settlement_domain as sd
from subsidy.v1 import events_pb2 as ev

T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
COURIER = sd.Evidence(sd.COURIER, "SF1")


def capture(order: str, at: dt.datetime = T0, **kw: object) -> sd.Capture:
    return sd.Capture(order, "m-1", 100, at, **kw)  # type: ignore[arg-type]


def test_overdue_lists_unevidenced_unrefunded_captures_past_the_days_oldest_first() -> None:
    captures = [
        capture("late-2", T0 + DAY),
        capture("late-1", T0),
        capture("evidenced", T0, evidence=COURIER),
        capture("refunded", T0, refunded=True),
        capture("in-time", T0 + 5 * DAY),
    ]
    now = T0 + 7 * DAY
    assert [c.order_id for c in sd.overdue(captures, now, 6)] == ["late-1", "late-2"]
    assert sd.overdue(captures, now, 8) == []


@pytest.mark.parametrize(
    ("c", "cmd", "reason"),
    [
        (None, sd.RecordEvidence("o", sd.COURIER, "SF1"), "UNKNOWN_ORDER"),
        (capture("o"), sd.RecordEvidence("o", "PHOTO", "x"), "INVALID_KIND"),
        (capture("o", refunded=True), sd.RecordEvidence("o", sd.COURIER, "SF1"), "ORDER_REFUNDED"),
        (
            capture("o", serial="SN1"),
            sd.RecordEvidence("o", sd.COURIER, "SF1"),
            "ACTIVATION_REQUIRED",
        ),
        (
            capture("o", serial="SN1"),
            sd.RecordEvidence("o", sd.ACTIVATION, "a", "SN2"),
            "SERIAL_MISMATCH",
        ),
        (capture("o"), sd.RecordEvidence("o", sd.ACTIVATION, "a", "SN2"), "UNEXPECTED_SERIAL"),
        (
            capture("o", evidence=COURIER),
            sd.RecordEvidence("o", sd.COURIER, "SF2"),
            "EVIDENCE_RECORDED",
        ),
    ],
)
def test_evidence_refusals(c: sd.Capture | None, cmd: sd.RecordEvidence, reason: str) -> None:
    with pytest.raises(DomainError) as err:
        sd.record_evidence(c, cmd)
    assert err.value.reason == reason


def test_a_batch_deducts_clawbacks_whole_oldest_first_while_the_gross_covers_them() -> None:
    captures = [capture("a", evidence=COURIER), capture("b", evidence=COURIER), capture("c")]
    claws = [
        sd.Clawback("x", "m-1", 150, "b-0"),
        sd.Clawback("y", "m-1", 60, "b-0"),
        sd.Clawback("z", "m-1", 40, "b-0"),
        sd.Clawback("w", "m-2", 10, "b-9"),  # another merchant's
    ]
    cmd = sd.CreateBatch("b-1", "m-1", T0, T0 + DAY)
    [created] = sd.create_batch(None, captures, claws, cmd)
    assert isinstance(created, ev.SettlementBatchCreated)
    assert [line.order_id for line in created.lines] == ["a", "b"]  # c has no evidence
    assert [c.order_id for c in created.clawbacks] == ["x", "z"]  # y (60) no longer fits
    assert (created.gross_fen, created.clawback_fen, created.net_fen) == (200, 190, 10)


def test_an_approved_batch_is_paid_once_and_never_by_its_maker() -> None:
    batch = sd.Batch("b-1", "m-1", sd.CREATED, "ops-a", 10)
    with pytest.raises(DomainError) as err:
        sd.approve_batch(batch, "b-1", "ops-a")
    assert err.value.reason == "MAKER_CHECKER"
    with pytest.raises(DomainError) as err:
        sd.mark_paid(batch, "b-1", "x1")
    assert err.value.reason == "BATCH_NOT_APPROVED"
    [approved] = sd.approve_batch(batch, "b-1", "ops-b")
    batch = sd.evolve_batch(batch, approved, "ops-b") or batch
    assert sd.approve_batch(batch, "b-1", "ops-a") == []  # approved: unchanged, by anyone
    [paid] = sd.mark_paid(batch, "b-1", "x1")
    batch = sd.evolve_batch(batch, paid, "ops-a") or batch
    assert sd.mark_paid(batch, "b-1", "x1") == []
    with pytest.raises(DomainError) as err:
        sd.mark_paid(batch, "b-1", "x2")
    assert err.value.reason == "BATCH_PAID"


def test_only_a_batched_order_is_clawed_back() -> None:
    assert sd.clawback(capture("a")) == []
    [claw] = sd.clawback(capture("a", batch_id="b-1"))
    assert isinstance(claw, ev.ClawbackRecorded)
    assert (claw.order_id, claw.fen, claw.batch_id) == ("a", 100, "b-1")
