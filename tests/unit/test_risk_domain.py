"""Who may change the risk rules and lists, and how a block is lifted (eligibility's
risk_domain): maker-checker as for funding and policies; a lift lets the subject through."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf.message import Message

from services.eligibility import risk_domain as rd
from services.kernel.contract import risk
from services.kernel.errors import DomainError
from subsidy.v1 import events_pb2 as ev

NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=dt.UTC)
RULES = risk.parse_rule_set(
    {
        "rules": [
            {
                "rule_id": "device-claims",
                "kind": "velocity",
                "action": "claim",
                "subject": "device",
                "window_s": 3600,
                "max_count": 3,
                "verdict": "block",
            }
        ]
    }
)
DEVICE = risk.Subject(risk.Kind.DEVICE, "idx-d", "ab***yz")
ENTRY = risk.ListEntry(
    "rle-1", risk.ListName.BLOCK, risk.Kind.DEVICE, "idx-d", "ab***yz", NOW + dt.timedelta(days=1)
)


def proposed(kind: str = rd.RULES, by: str = "li") -> rd.RiskChange:
    events = (
        rd.propose_rules(None, rd.ProposeRules("rc-1", RULES, "hoarding"))
        if kind == rd.RULES
        else rd.propose_list_change(None, rd.ProposeListChange("rc-1", rd.ADD, ENTRY, "x", "y"))
    )
    change = rd.evolve_change(None, events[0], by)
    assert change is not None
    return change


def refused(call: object) -> tuple[str, str]:
    assert callable(call)
    with pytest.raises(DomainError) as caught:
        call()
    return caught.value.reason, caught.value.field


def test_a_proposal_changes_nothing_and_carries_the_whole_rule_set() -> None:
    change = proposed()
    assert (change.status, change.proposed_by, change.rules) == (rd.PROPOSED, "li", RULES)


def test_the_proposer_may_not_approve_their_own_change() -> None:
    change = proposed(by="li")
    assert refused(lambda: rd.approve(change, rd.Approve("rc-1", "li", "ok"))) == (
        "MAKER_CHECKER",
        "change_id",
    )
    (approved,) = rd.approve(change, rd.Approve("rc-1", "wang", "ok"))
    assert isinstance(approved, ev.RiskChangeApproved) and approved.proposed_by == "li"
    after = rd.evolve_change(change, approved, "wang")
    assert after is not None and (after.status, after.approved_by) == (rd.APPROVED, "wang")
    assert rd.approve(after, rd.Approve("rc-1", "zhao", "again")) == []  # once


def test_an_unknown_change_cannot_be_approved() -> None:
    assert refused(lambda: rd.approve(None, rd.Approve("rc-x", "wang", ""))) == (
        "UNKNOWN_RISK_CHANGE",
        "change_id",
    )


def test_an_approved_rule_set_is_the_next_version() -> None:
    (activated,) = rd.activate_rules(4, proposed())
    assert isinstance(activated, ev.RiskRulesActivated)
    assert (activated.version, activated.change_id) == (5, "rc-1")
    assert [r.rule_id for r in activated.rule_set.rules] == ["device-claims"]


def test_removing_an_entry_that_is_gone_refuses_the_approval() -> None:
    change = rd.RiskChange("rc-2", rd.LIST, rd.APPROVED, "li", list_change=rd.REMOVE, entry=ENTRY)
    assert refused(lambda: rd.change_list(7, change, None)) == ("UNKNOWN_LIST_ENTRY", "entry_id")
    (removed,) = rd.change_list(7, change, ENTRY)
    assert isinstance(removed, ev.RiskListChanged)
    assert (removed.version, removed.change, removed.entry.entry_id) == (8, "remove", "rle-1")


def lift(
    decision: rd.Decision | None, blocking: risk.ListEntry | None = None, secs: int = 0
) -> tuple[list[Message], rd.ListEdit | None]:
    return rd.lift(decision, rd.Lift("rd-1", "checked", secs, "rle-new", NOW), blocking)


def test_lifting_a_block_by_a_list_entry_removes_the_entry() -> None:
    decision = rd.Decision("rd-1", "block", rd.OPEN, DEVICE, "rle-1", 0)
    events, edit = lift(decision, ENTRY)
    assert [type(e) for e in events] == [ev.RiskBlockLifted]
    assert edit is not None and (edit.change, edit.entry) == (rd.REMOVE, ENTRY)
    # Removed meanwhile by an approved removal: the lift does not remove it twice.
    assert rd.apply_lift(3, None, edit, "rd-1") == []


def test_lifting_a_block_by_a_rule_exempts_the_subject_for_the_rule_window() -> None:
    decision = rd.Decision("rd-1", "block", rd.OPEN, DEVICE, "", 3600)
    _, edit = lift(decision)
    assert edit is not None and edit.change == rd.ADD
    assert (edit.entry.list, edit.entry.kind, edit.entry.index) == (
        risk.ListName.ALLOW,
        risk.Kind.DEVICE,
        "idx-d",
    )
    assert edit.entry.expires_at == NOW + dt.timedelta(hours=1)
    _, longer = lift(decision, secs=86400)
    assert longer is not None and longer.entry.expires_at == NOW + dt.timedelta(days=1)
    (changed,) = rd.apply_lift(3, None, edit, "rd-1")
    assert isinstance(changed, ev.RiskListChanged)
    assert (changed.version, changed.decision_id) == (4, "rd-1")


def test_only_an_open_block_can_be_lifted() -> None:
    assert refused(lambda: lift(None)) == ("UNKNOWN_DECISION", "decision_id")
    flag = rd.Decision("rd-1", "flag", rd.OPEN, DEVICE, "", 3600)
    assert refused(lambda: lift(flag)) == ("NOT_A_BLOCK", "decision_id")
    lifted = rd.Decision("rd-1", "block", rd.LIFTED, DEVICE, "", 3600)
    assert lift(lifted) == ([], None)
