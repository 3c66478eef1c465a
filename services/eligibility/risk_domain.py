"""Risk-control decisions, pure: who may change the rules and lists, and how.

Maker-checker, like a budget's funding and a policy: an operator proposes a change (a whole new
rule-set version, or one list entry added or removed) and nothing changes; a different person
with the approver role approves it, and the approval activates it: the next rule-set version
(the ``risk-rules`` stream's version) or the next lists version (``risk-lists``'). An operator
lifts a block, with a reason: the block-list entry that blocked is removed, or, for a block by a
rule, the subject is put on the allow list for a while (the rule's window unless said).
The verdicts themselves are the shared engine's (services/kernel/contract/risk.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Final

from google.protobuf.message import Message

from services.kernel.contract import risk
from services.kernel.contract.risk_proto import (
    entry_message,
    entry_of,
    rule_set_message,
    rule_set_of,
)
from services.kernel.errors import FailedPrecondition, NotFound, PermissionDenied
from subsidy.v1 import events_pb2 as ev

PROPOSED: Final = "PROPOSED"
APPROVED: Final = "APPROVED"
RULES: Final = "rules"
LIST: Final = "list"
ADD: Final = "add"
REMOVE: Final = "remove"
OPEN: Final = "OPEN"
LIFTED: Final = "LIFTED"


@dataclass(frozen=True)
class RiskChange:
    """A proposed change as its stream has made it."""

    change_id: str
    kind: str  # rules, list
    status: str
    proposed_by: str
    approved_by: str = ""
    reason: str = ""
    rules: risk.RuleSet | None = None
    list_change: str = ""
    entry: risk.ListEntry | None = None
    entry_reason: str = ""


@dataclass(frozen=True)
class Decision:
    """A recorded block or flag, as far as lifting it needs."""

    decision_id: str
    outcome: str
    status: str
    subject: risk.Subject | None
    entry_id: str
    window_s: int


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class ProposeRules:
    change_id: str
    rules: risk.RuleSet
    reason: str


@dataclass(frozen=True)
class ProposeListChange:
    change_id: str
    change: str  # add, remove
    entry: risk.ListEntry  # to add, or the live entry to remove
    entry_reason: str
    reason: str


@dataclass(frozen=True)
class Approve:
    change_id: str
    approver: str  # the approver's name, from their certificate
    reason: str


@dataclass(frozen=True)
class Lift:
    decision_id: str
    reason: str
    exempt_for_s: int  # 0: the window of the rule that blocked
    exemption_id: str  # the allow entry's id, if the lift makes one
    now: dt.datetime


# --------------------------------------------------------------------------------------------
# Decisions


def unknown_change() -> NotFound:
    return NotFound("UNKNOWN_RISK_CHANGE", "change_id: no such risk change", field="change_id")


def unknown_entry() -> NotFound:
    return NotFound("UNKNOWN_LIST_ENTRY", "entry_id: no live list entry", field="entry_id")


def unknown_decision() -> NotFound:
    return NotFound("UNKNOWN_DECISION", "decision_id: no such decision", field="decision_id")


def propose_rules(existing: RiskChange | None, cmd: ProposeRules) -> list[Message]:
    """An operator proposes a new rule-set version (already checked strictly at the edge)."""
    if existing is not None:  # change ids are fresh: a collision is a bug, not a retry
        raise FailedPrecondition("RISK_CHANGE_EXISTS", "change_id: proposed already")
    return [
        ev.RiskChangeProposed(
            change_id=cmd.change_id,
            kind=RULES,
            rule_set=rule_set_message(cmd.rules),
            reason=cmd.reason,
        )
    ]


def propose_list_change(existing: RiskChange | None, cmd: ProposeListChange) -> list[Message]:
    """An operator proposes adding an entry to a list, or removing a live one."""
    if existing is not None:
        raise FailedPrecondition("RISK_CHANGE_EXISTS", "change_id: proposed already")
    return [
        ev.RiskChangeProposed(
            change_id=cmd.change_id,
            kind=LIST,
            list_change=cmd.change,
            entry=entry_message(cmd.entry, cmd.entry_reason),
            reason=cmd.reason,
        )
    ]


def approve(change: RiskChange | None, cmd: Approve) -> list[Message]:
    """A different person approves a proposed change; approving it again changes nothing."""
    if change is None:
        raise unknown_change()
    if change.status == APPROVED:
        return []
    if cmd.approver == change.proposed_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "change_id: the approver must be a different person from the proposer",
            field="change_id",
        )
    return [
        ev.RiskChangeApproved(
            change_id=change.change_id, proposed_by=change.proposed_by, reason=cmd.reason
        )
    ]


def activate_rules(rules_version: int, change: RiskChange) -> list[Message]:
    """The approved rule set becomes the next version (appended to ``risk-rules``)."""
    assert change.rules is not None
    return [
        ev.RiskRulesActivated(
            version=rules_version + 1,
            rule_set=rule_set_message(change.rules),
            change_id=change.change_id,
        )
    ]


def list_changed(
    lists_version: int,
    change: str,
    entry: risk.ListEntry,
    entry_reason: str,
    *,
    change_id: str = "",
    decision_id: str = "",
) -> list[Message]:
    """One list change as the next lists version (appended to ``risk-lists``)."""
    return [
        ev.RiskListChanged(
            version=lists_version + 1,
            change=change,
            entry=entry_message(entry, entry_reason),
            change_id=change_id,
            decision_id=decision_id,
        )
    ]


def change_list(
    lists_version: int, change: RiskChange, live: risk.ListEntry | None
) -> list[Message]:
    """An approved list change takes effect; removing an entry that is no longer live (a lift
    or another removal got there first) is refused, and the approval with it."""
    assert change.entry is not None
    if change.list_change == REMOVE and live is None:
        raise unknown_entry()
    return list_changed(
        lists_version,
        change.list_change,
        change.entry,
        change.entry_reason,
        change_id=change.change_id,
    )


@dataclass(frozen=True)
class ListEdit:
    """The list change a lift makes."""

    change: str
    entry: risk.ListEntry
    reason: str


def lift(
    decision: Decision | None, cmd: Lift, blocking: risk.ListEntry | None
) -> tuple[list[Message], ListEdit | None]:
    """An operator lifts a block: the decision is marked lifted, and the subject is let
    through: the block-list entry that blocked (``blocking``, if still live) is removed, or the
    subject a rule blocked is exempted by an allow entry for ``exempt_for_s`` (the rule's window
    unless given). Lifting a lifted block again changes nothing."""
    if decision is None:
        raise unknown_decision()
    if decision.outcome != str(risk.Outcome.BLOCK):
        raise FailedPrecondition(
            "NOT_A_BLOCK", "decision_id: only a block can be lifted", field="decision_id"
        )
    if decision.status == LIFTED:
        return [], None
    edit: ListEdit | None = None
    if decision.entry_id:
        if blocking is not None:
            edit = ListEdit(REMOVE, blocking, cmd.reason)
    elif decision.subject is not None:
        seconds = cmd.exempt_for_s or decision.window_s
        edit = ListEdit(
            ADD,
            risk.ListEntry(
                entry_id=cmd.exemption_id,
                list=risk.ListName.ALLOW,
                kind=decision.subject.kind,
                index=decision.subject.index,
                masked=decision.subject.masked,
                expires_at=cmd.now + dt.timedelta(seconds=seconds),
            ),
            cmd.reason,
        )
    lifted = ev.RiskBlockLifted(
        decision_id=decision.decision_id,
        reason=cmd.reason,
        entry_id=edit.entry.entry_id if edit is not None else "",
    )
    return [lifted], edit


def apply_lift(
    lists_version: int, live: risk.ListEntry | None, edit: ListEdit, decision_id: str
) -> list[Message]:
    """The list change of a lift, under the lists' lock: a block entry removed meanwhile (by an
    approved removal) needs no second removal."""
    if edit.change == REMOVE and live is None:
        return []
    return list_changed(
        lists_version, edit.change, edit.entry, edit.reason, decision_id=decision_id
    )


# --------------------------------------------------------------------------------------------
# Evolution


def evolve_change(change: RiskChange | None, event: Message, actor_id: str) -> RiskChange | None:
    """The change after ``event``: the one place its status changes."""
    if isinstance(event, ev.RiskChangeProposed):
        return RiskChange(
            change_id=event.change_id,
            kind=event.kind,
            status=PROPOSED,
            proposed_by=actor_id,
            reason=event.reason,
            rules=rule_set_of(event.rule_set) if event.kind == RULES else None,
            list_change=event.list_change,
            entry=entry_of(event.entry) if event.kind == LIST else None,
            entry_reason=event.entry.reason,
        )
    if change is not None and isinstance(event, ev.RiskChangeApproved):
        return replace(change, status=APPROVED, approved_by=actor_id)
    return change
