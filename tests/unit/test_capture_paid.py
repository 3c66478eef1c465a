"""Capture records what was paid: the paid amount plus the subsidy must be the reserved unit
price, or the capture is refused or flagged as the order's policy says (``funding.paid_amount``;
a version published before the rule flags, and keeps its canonical forms byte for byte)."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from services.kernel.contract.policy import (
    FundingRules,
    PaidAmount,
    PolicyError,
    default_policy,
    policy_from_dict,
    policy_from_json,
    policy_from_proto,
    policy_json,
    policy_to_dict,
    policy_to_proto,
)
from services.kernel.errors import FailedPrecondition
from services.ledger import domain
from subsidy.v1 import events_pb2 as ev

PRICE, SUBSIDY = 300_000, 45_000
RES = domain.Reservation("o-1", "pool-1", SUBSIDY, domain.PENDING, "q-1", unit_price_fen=PRICE)
FUNDING = {"sources": ["district"], "split": "priority", "alert_thresholds_bp": []}


def captured(events: list[Message]) -> ev.SubsidyCaptured:
    [event] = events
    assert isinstance(event, ev.SubsidyCaptured)
    return event


@pytest.mark.parametrize("rule", list(PaidAmount))
def test_the_exact_paid_amount_is_captured_unflagged_under_either_rule(rule: PaidAmount) -> None:
    event = captured(domain.capture(RES, "pay-1", PRICE - SUBSIDY, rule))
    assert (event.paid_amount_fen, event.flag, event.subsidy_fen) == (PRICE - SUBSIDY, "", SUBSIDY)
    assert event.HasField("paid_amount_fen")


@pytest.mark.parametrize(
    ("paid", "flag"),
    [
        (PRICE, domain.PAID_AMOUNT_MISMATCH),  # the platform charged the full price
        (PRICE - SUBSIDY - 1, domain.PAID_AMOUNT_MISMATCH),  # one fen short
        (PRICE - SUBSIDY + 1, domain.PAID_AMOUNT_MISMATCH),
        (0, domain.PAID_AMOUNT_MISMATCH),
        (None, domain.PAID_AMOUNT_MISSING),
    ],
)
def test_a_mismatch_is_flagged_or_refused_per_policy(paid: int | None, flag: str) -> None:
    event = captured(domain.capture(RES, "pay-1", paid, PaidAmount.FLAG))
    assert event.flag == flag
    assert event.HasField("paid_amount_fen") is (paid is not None)
    with pytest.raises(FailedPrecondition) as refused:
        domain.capture(RES, "pay-1", paid, PaidAmount.REFUSE)
    assert (refused.value.reason, refused.value.field) == (flag, "paid_amount_fen")


def test_a_capture_again_changes_nothing_whatever_amount_it_declares() -> None:
    done = domain.Reservation("o-1", "pool-1", SUBSIDY, domain.CAPTURED, unit_price_fen=PRICE)
    assert domain.capture(done, "pay-1", 1, PaidAmount.REFUSE) == []


def test_the_reservation_remembers_its_unit_price_from_the_event() -> None:
    reserved = ev.SubsidyReserved(order_id="o-1", pool_id="p", subsidy_fen=SUBSIDY)
    reserved.unit_price_fen = PRICE
    res = domain.evolve(None, reserved)
    assert res is not None and res.unit_price_fen == PRICE


def test_capture_and_alert_applies_the_rule_of_the_order_policy() -> None:
    rules = FundingRules(paid_amount=PaidAmount.REFUSE)
    with pytest.raises(FailedPrecondition):
        domain.capture_and_alert(domain.Settle(RES), "pay-1", rules, PRICE)
    [event] = domain.capture_and_alert(domain.Settle(RES), "pay-1", rules, PRICE - SUBSIDY)
    assert isinstance(event, ev.SubsidyCaptured) and event.flag == ""


def test_old_policies_flag_and_keep_their_canonical_forms() -> None:
    old = policy_from_dict(policy_to_dict(default_policy()) | {"funding": FUNDING})
    assert old.funding.paid_amount is PaidAmount.FLAG
    assert "paid_amount" not in policy_to_dict(old)["funding"]
    assert '"paid_amount"' not in policy_json(old)
    message = policy_to_proto(old)
    assert message.funding.paid_amount == 0  # unspecified: not written on the wire
    assert policy_from_proto(message) == old


def test_refuse_reads_back_the_same_from_the_document_json_and_the_message() -> None:
    doc = policy_to_dict(default_policy()) | {"funding": FUNDING | {"paid_amount": "refuse"}}
    policy = policy_from_dict(doc)
    assert policy.funding.paid_amount is PaidAmount.REFUSE
    assert policy_to_dict(policy)["funding"]["paid_amount"] == "refuse"
    assert policy_from_json(policy_json(policy)) == policy
    assert policy_from_proto(policy_to_proto(policy)) == policy


def test_an_unknown_rule_is_refused_naming_its_field() -> None:
    doc = policy_to_dict(default_policy()) | {"funding": FUNDING | {"paid_amount": "ignore"}}
    with pytest.raises(PolicyError) as err:
        policy_from_dict(doc)
    assert "funding.paid_amount" in str(err.value)


def test_evidence_days_default_to_30_unwritten_and_read_back_when_set() -> None:
    old = policy_from_dict(policy_to_dict(default_policy()) | {"funding": FUNDING})
    assert old.funding.evidence_days == 30
    assert "evidence_days" not in policy_to_dict(old)["funding"]
    assert policy_to_proto(old).funding.evidence_days == 0
    doc = policy_to_dict(default_policy()) | {"funding": FUNDING | {"evidence_days": 7}}
    policy = policy_from_dict(doc)
    assert policy.funding.evidence_days == 7
    assert policy_from_json(policy_json(policy)) == policy
    assert policy_from_proto(policy_to_proto(policy)) == policy


@pytest.mark.parametrize("days", [0, -1, 367, 1.5, "7"])
def test_evidence_days_out_of_range_are_refused_naming_the_field(days: object) -> None:
    doc = policy_to_dict(default_policy()) | {"funding": FUNDING | {"evidence_days": days}}
    with pytest.raises(PolicyError) as err:
        policy_from_dict(doc)
    assert "funding.evidence_days" in str(err.value)
