"""Supervision cases, pure: state + command -> events, and how each event changes a case.
No I/O, no clock: the time a command is decided at comes in the command.

A case is opened by a complaint (a platform files one about an order, for a consumer or a
merchant, or an operator does), by a risk alert (a block or a flag the risk engine recorded),
or by unusual operator activity (too many overrides by one person within the policy's window).
Its deadlines come from the policy's ``supervision`` part: a first response (an assignment or a
note) and a resolution. A case is OPEN until resolved; an outcome that moves money (a clawback,
a reconciliation correction) is proposed and waits, AWAITING_APPROVAL, for a different person
to approve it (maker-checker); then it is RESOLVED, once. Each deadline that passes raises one
CaseOverdue. The outcome is carried out by the service that owns what it changes (eligibility
restores or forfeits a qualification, and its event names the case: CaseOutcomeApplied links
it here); the case never edits another service's data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, replace
from typing import Final

from google.protobuf.message import Message

from services.kernel.contract.policy import Supervision
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import events_pb2 as ev

# Kinds
COMPLAINT: Final = "COMPLAINT"
RISK_ALERT: Final = "RISK_ALERT"
OPERATOR_ACTIVITY: Final = "OPERATOR_ACTIVITY"
DETECTION: Final = "DETECTION"  # a post-hoc detector's finding (services/audit/detectors.py)
SUPERVISOR_REVIEW: Final = "SUPERVISOR_REVIEW"  # an action a supervisor flagged (reviews_domain)
KINDS: Final = (COMPLAINT, RISK_ALERT, OPERATOR_ACTIVITY, DETECTION, SUPERVISOR_REVIEW)
# Who complains
CONSUMER: Final = "CONSUMER"
MERCHANT: Final = "MERCHANT"
COMPLAINANTS: Final = (CONSUMER, MERCHANT)
# Priorities
LOW: Final = "LOW"
NORMAL: Final = "NORMAL"
HIGH: Final = "HIGH"
# Statuses
OPEN: Final = "OPEN"
AWAITING_APPROVAL: Final = "AWAITING_APPROVAL"
RESOLVED: Final = "RESOLVED"
STATUSES: Final = (OPEN, AWAITING_APPROVAL, RESOLVED)
# Deadlines
FIRST_RESPONSE: Final = "FIRST_RESPONSE"
RESOLUTION: Final = "RESOLUTION"

# Outcomes. Eligibility carries out the qualification ones (subsidyctl calls it with the case
# id, and its event links back); the others are recorded for the owning service's operators to
# act on; the money ones need a second person.
NO_ACTION: Final = "NO_ACTION"
RESTORE_QUALIFICATION: Final = "RESTORE_QUALIFICATION"
FORFEIT_QUALIFICATION: Final = "FORFEIT_QUALIFICATION"
LIFT_BLOCK: Final = "LIFT_BLOCK"
ADD_BLOCK: Final = "ADD_BLOCK"
SUSPEND_MERCHANT: Final = "SUSPEND_MERCHANT"
CLAWBACK: Final = "CLAWBACK"
CORRECT_RECONCILIATION: Final = "CORRECT_RECONCILIATION"
OUTCOMES: Final = (
    NO_ACTION,
    RESTORE_QUALIFICATION,
    FORFEIT_QUALIFICATION,
    LIFT_BLOCK,
    ADD_BLOCK,
    SUSPEND_MERCHANT,
    CLAWBACK,
    CORRECT_RECONCILIATION,
)
ON_QUALIFICATION: Final = frozenset({RESTORE_QUALIFICATION, FORFEIT_QUALIFICATION})
# The owning service's event that carries each acting outcome out (linked as applied).
CARRIED_OUT_BY: Final = {
    RESTORE_QUALIFICATION: ev.QualificationRestored.DESCRIPTOR.full_name,
    FORFEIT_QUALIFICATION: ev.QualificationForfeited.DESCRIPTOR.full_name,
    LIFT_BLOCK: ev.RiskBlockLifted.DESCRIPTOR.full_name,  # a risk alert's block (its subject)
}
MOVES_MONEY: Final = frozenset({CLAWBACK, CORRECT_RECONCILIATION})

# The events that override a control, counted per person for the operator-activity alarm
# (a qualification restored or forfeited counts only when a case did it: a refund's does not).
OVERRIDES: Final = frozenset(
    m.DESCRIPTOR.full_name
    for m in (
        ev.RiskBlockLifted,
        ev.QualificationRestored,
        ev.QualificationForfeited,
        ev.MerchantReinstated,
        ev.CategoryResumed,
        ev.CampaignResumed,
        ev.OutboxEventSkipped,
        ev.DeadLetterReplayed,
    )
)


# --------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Case:
    """One case as its stream has made it."""

    case_id: str
    kind: str
    priority: str
    status: str
    platform_id: str
    order_id: str
    complainant: str
    opened_at: dt.datetime
    first_response_due: dt.datetime
    resolution_due: dt.datetime
    subject: str = ""
    summary: str = ""
    text_length: int = 0
    text_sha256: str = ""
    responded: bool = False
    assignee: str = ""
    outcome: str = ""
    qualification_id: str = ""
    amount_fen: int = 0
    proposed_by: str = ""
    overdue: tuple[str, ...] = ()
    applied_event_id: str = ""
    notes: int = 0

    @property
    def deadline(self) -> dt.datetime:
        """The next deadline: the first response until there is one, then the resolution."""
        if not self.responded and self.status != RESOLVED:
            return self.first_response_due
        return self.resolution_due


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Open:
    """Open a case (a complaint, a risk alert, operator activity); texts arrive sealed."""

    case_id: str
    kind: str
    priority: str
    now: dt.datetime
    supervision: Supervision
    platform_id: str = ""
    order_id: str = ""
    complainant: str = ""
    text_sealed: bytes = b""
    text_sha256: str = ""
    text_length: int = 0
    subject: str = ""
    source_event_id: str = ""
    summary: str = ""


@dataclass(frozen=True)
class Assign:
    assignee: str
    now: dt.datetime


@dataclass(frozen=True)
class Note:
    text_sealed: bytes
    text_sha256: str
    text_length: int
    now: dt.datetime


@dataclass(frozen=True)
class Resolve:
    outcome: str
    by: str  # the resolver's name, from their certificate
    now: dt.datetime
    qualification_id: str = ""
    order_id: str = ""
    amount_fen: int = 0


@dataclass(frozen=True)
class Approve:
    approver: str  # from their certificate
    now: dt.datetime


# --------------------------------------------------------------------------------------------
# Decisions


def unknown_case() -> NotFound:
    return NotFound("UNKNOWN_CASE", "case_id: no such case", field="case_id")


def already_resolved() -> FailedPrecondition:
    return FailedPrecondition("CASE_ALREADY_RESOLVED", "case_id: resolved already", field="case_id")


def visible(case: Case | None, platform: str | None) -> Case | None:
    """The case as a caller may see it: a platform only the complaints it filed (another's
    reads as unknown, so a platform cannot probe which case ids exist)."""
    if case is None or platform is None:
        return case
    return case if case.kind == COMPLAINT and case.platform_id == platform else None


def check_order(order_platform: str | None, platform_id: str) -> None:
    """A complaint names an order of the platform it is filed for: one the log has not seen
    (yet: an order reaches it within seconds of its reservation) or another platform's reads
    as unknown, so a platform cannot learn which order ids another has."""
    if order_platform is None or order_platform != platform_id:
        raise NotFound(
            "UNKNOWN_ORDER",
            "order_id: no order of this platform (an order is known here within seconds of "
            "its reservation)",
            field="order_id",
        )


def deadlines(opened_at: dt.datetime, rules: Supervision) -> tuple[dt.datetime, dt.datetime]:
    """When the first response and the resolution of a case opened at ``opened_at`` are due."""
    return (
        opened_at + dt.timedelta(hours=rules.first_response_hours),
        opened_at + dt.timedelta(hours=rules.resolution_hours),
    )


def open_case(existing: Case | None, cmd: Open) -> list[Message]:
    """A new case with its deadlines from the policy in force. The same case id again is a
    repeat (a redelivered risk decision, a replayed alarm): nothing changes."""
    if existing is not None:
        return []
    first, resolution = deadlines(cmd.now, cmd.supervision)
    event = ev.CaseOpened(
        case_id=cmd.case_id,
        kind=cmd.kind,
        priority=cmd.priority,
        platform_id=cmd.platform_id,
        order_id=cmd.order_id,
        complainant=cmd.complainant,
        text_sealed=cmd.text_sealed,
        text_sha256=cmd.text_sha256,
        text_length=cmd.text_length,
        subject=cmd.subject,
        source_event_id=cmd.source_event_id,
        summary=cmd.summary,
    )
    event.opened_at.FromDatetime(cmd.now)
    event.first_response_due.FromDatetime(first)
    event.resolution_due.FromDatetime(resolution)
    return [event]


def complaint_case_id(platform_id: str, complaint_id: str) -> str:
    """The case of a platform's complaint id: the same id filed again names the same case."""
    digest = hashlib.sha256(f"{platform_id}\x00{complaint_id}".encode()).hexdigest()
    return f"case-{digest[:20]}"


def file_complaint(existing: Case | None, cmd: Open) -> list[Message]:
    """A complaint opens its case. The same complaint filed again (a platform retrying after a
    lost answer) changes nothing; the case's id reused for a different complaint (another
    order, complainant or text) is refused, so a retry can never hide a second complaint."""
    if existing is None:
        return open_case(None, cmd)
    filed = (existing.kind, existing.platform_id, existing.order_id, existing.complainant)
    if filed != (COMPLAINT, cmd.platform_id, cmd.order_id, cmd.complainant) or (
        existing.text_sha256 != cmd.text_sha256
    ):
        raise AlreadyExists(
            "COMPLAINT_ID_REUSED",
            "complaint_id: names a different complaint already filed",
            field="complaint_id",
        )
    return []


def assign(case: Case | None, cmd: Assign) -> list[Message]:
    """An operator takes the case (a first response); assigning it again to the same person
    changes nothing; a resolved case stays as it was resolved."""
    if case is None:
        raise unknown_case()
    if case.status == RESOLVED:
        raise already_resolved()
    if case.assignee == cmd.assignee:
        return []
    event = ev.CaseAssigned(case_id=case.case_id, assignee=cmd.assignee)
    event.at.FromDatetime(cmd.now)
    return [event]


def note(case: Case | None, cmd: Note) -> list[Message]:
    """A note (a first response too); a resolved case takes follow-up notes."""
    if case is None:
        raise unknown_case()
    event = ev.CaseNoteAdded(
        case_id=case.case_id,
        text_sealed=cmd.text_sealed,
        text_sha256=cmd.text_sha256,
        text_length=cmd.text_length,
    )
    event.at.FromDatetime(cmd.now)
    return [event]


def reveal(case: Case | None, now: dt.datetime) -> list[Message]:
    """A person reads the case's sealed texts: recorded every time (who and when)."""
    if case is None:
        raise unknown_case()
    event = ev.CaseTextRevealed(case_id=case.case_id)
    event.at.FromDatetime(now)
    return [event]


def resolve(case: Case | None, cmd: Resolve) -> list[Message]:
    """Resolve the case with an outcome, once. An outcome on a qualification names it; one
    that moves money names the order and the amount, and is only proposed: a different person
    approves it (:func:`approve`)."""
    if case is None:
        raise unknown_case()
    if case.status == RESOLVED:
        raise already_resolved()
    if case.status == AWAITING_APPROVAL:
        raise FailedPrecondition(
            "CASE_AWAITING_APPROVAL",
            f"case_id: {case.outcome} was proposed and awaits a second person's approval",
            field="case_id",
        )
    if cmd.outcome not in OUTCOMES:
        raise InvalidArgument(
            "INVALID_CHOICE", f"outcome: one of {', '.join(OUTCOMES)}", field="outcome"
        )
    if cmd.outcome in ON_QUALIFICATION and not cmd.qualification_id:
        raise InvalidArgument(
            "MISSING_FIELD",
            f"qualification_id: required for {cmd.outcome}",
            field="qualification_id",
        )
    if cmd.outcome in MOVES_MONEY:
        if not cmd.order_id:
            raise InvalidArgument(
                "MISSING_FIELD", f"order_id: required for {cmd.outcome}", field="order_id"
            )
        if cmd.amount_fen <= 0:
            raise InvalidArgument(
                "INVALID_AMOUNT", "amount_fen: a positive amount of fen", field="amount_fen"
            )
        proposed = ev.CaseOutcomeProposed(
            case_id=case.case_id,
            outcome=cmd.outcome,
            order_id=cmd.order_id,
            amount_fen=cmd.amount_fen,
            proposed_by=cmd.by,
        )
        proposed.at.FromDatetime(cmd.now)
        return [proposed]
    resolved = ev.CaseResolved(
        case_id=case.case_id,
        outcome=cmd.outcome,
        qualification_id=cmd.qualification_id,
        order_id=cmd.order_id or case.order_id,
    )
    resolved.at.FromDatetime(cmd.now)
    return [resolved]


def approve(case: Case | None, cmd: Approve) -> list[Message]:
    """A different person approves the proposed money outcome, which resolves the case."""
    if case is None:
        raise unknown_case()
    if case.status == RESOLVED:
        raise already_resolved()
    if case.status != AWAITING_APPROVAL:
        raise FailedPrecondition(
            "NOTHING_TO_APPROVE", "case_id: no outcome awaits approval", field="case_id"
        )
    if cmd.approver == case.proposed_by:
        raise PermissionDenied(
            "MAKER_CHECKER",
            "case_id: the approver must be a different person from the proposer",
            field="case_id",
        )
    resolved = ev.CaseResolved(
        case_id=case.case_id,
        outcome=case.outcome,
        order_id=case.order_id,
        amount_fen=case.amount_fen,
        proposed_by=case.proposed_by,
    )
    resolved.at.FromDatetime(cmd.now)
    return [resolved]


def overdue(case: Case | None, now: dt.datetime) -> list[Message]:
    """The sweeper: one CaseOverdue for each deadline that has passed unmet, once each."""
    if case is None or case.status == RESOLVED:
        return []
    due: list[tuple[str, dt.datetime]] = []
    if not case.responded and case.first_response_due <= now:
        due.append((FIRST_RESPONSE, case.first_response_due))
    if case.resolution_due <= now:
        due.append((RESOLUTION, case.resolution_due))
    events: list[Message] = []
    for deadline, at in due:
        if deadline in case.overdue:
            continue
        event = ev.CaseOverdue(case_id=case.case_id, deadline=deadline)
        event.due.FromDatetime(at)
        event.detected_at.FromDatetime(now)
        events.append(event)
    return events


def applied(case: Case | None, service: str, event_id: str, event_type: str) -> list[Message]:
    """The owning service's event that carried out the case's resolved outcome, linked once
    (an event of another kind, or before the case was resolved, is no outcome of it)."""
    if case is None or case.status != RESOLVED or case.applied_event_id:
        return []
    if CARRIED_OUT_BY.get(case.outcome) != event_type:
        return []
    return [
        ev.CaseOutcomeApplied(
            case_id=case.case_id, service=service, event_id=event_id, event_type=event_type
        )
    ]


def operator_case_due(overrides_in_window: int, rules: Supervision, open_case: bool) -> bool:
    """Whether one person's overrides within the policy's window open an operator-activity
    case: at the limit, unless a case about that person is still open (one at a time)."""
    return overrides_in_window >= rules.override_limit and not open_case


def finding_case_id(key: str) -> str:
    """The case a detector's finding opens: one per finding key (the same suspicion found
    again by a later run maps to the same case, so it is opened once)."""
    return "det-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def risk_priority(outcome: str) -> str:
    """A block stopped someone: high; a flag let them through for review: normal."""
    return HIGH if outcome == "block" else NORMAL


# --------------------------------------------------------------------------------------------
# Evolution: the one place a case's status changes


def _at(stamp: object) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)  # type: ignore[attr-defined,no-any-return]


def evolve(case: Case | None, event: Message) -> Case | None:
    """The case after ``event``; the projection and any replay call this."""
    if isinstance(event, ev.CaseOpened):
        return Case(
            case_id=event.case_id,
            kind=event.kind,
            priority=event.priority,
            status=OPEN,
            platform_id=event.platform_id,
            order_id=event.order_id,
            complainant=event.complainant,
            opened_at=_at(event.opened_at),
            first_response_due=_at(event.first_response_due),
            resolution_due=_at(event.resolution_due),
            subject=event.subject,
            summary=event.summary,
            text_length=event.text_length,
            text_sha256=event.text_sha256,
        )
    if case is None:
        return None
    if isinstance(event, ev.CaseAssigned):
        return replace(case, assignee=event.assignee, responded=True)
    if isinstance(event, ev.CaseNoteAdded):
        return replace(case, responded=True, notes=case.notes + 1)
    if isinstance(event, ev.CaseOutcomeProposed):
        return replace(
            case,
            status=AWAITING_APPROVAL,
            outcome=event.outcome,
            order_id=event.order_id or case.order_id,
            amount_fen=event.amount_fen,
            proposed_by=event.proposed_by,
            responded=True,
        )
    if isinstance(event, ev.CaseResolved):
        return replace(
            case,
            status=RESOLVED,
            outcome=event.outcome,
            qualification_id=event.qualification_id,
            order_id=event.order_id or case.order_id,
            amount_fen=event.amount_fen,
            proposed_by=event.proposed_by,
            responded=True,
        )
    if isinstance(event, ev.CaseOverdue):
        return replace(case, overdue=(*case.overdue, event.deadline))
    if isinstance(event, ev.CaseOutcomeApplied):
        return replace(case, applied_event_id=event.event_id)
    return case
