"""Supervision cases, pure: deadlines from the policy, first response, resolution once,
maker-checker for money outcomes, overdue alerts once per deadline, the operator-activity alarm,
and what a platform may see. No infrastructure; every "now" comes from the test."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

import pytest
from google.protobuf.message import Message

from services.audit import cases_domain as domain
from services.audit.cases_domain import (
    Approve,
    Assign,
    Case,
    Note,
    Open,
    Resolve,
    evolve,
)
from services.kernel.contract.policy import Supervision
from services.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from subsidy.v1 import events_pb2 as ev

NOW = dt.datetime(2025, 6, 1, 2, 0, tzinfo=dt.UTC)
RULES = Supervision(first_response_hours=24, resolution_hours=168)
HOUR = dt.timedelta(hours=1)


def play(case: Case | None, events: Sequence[Message]) -> Case | None:
    for event in events:
        case = evolve(case, event)
    return case


def complaint(now: dt.datetime = NOW, rules: Supervision = RULES) -> Case:
    cmd = Open("case-1", domain.COMPLAINT, domain.NORMAL, now, rules, "jd", "o-1", "CONSUMER")
    case = play(None, domain.open_case(None, cmd))
    assert case is not None
    return case


def test_a_complaint_opens_with_its_deadlines_from_the_policy() -> None:
    case = complaint(rules=Supervision(first_response_hours=4, resolution_hours=48))
    assert case.status == domain.OPEN and case.kind == domain.COMPLAINT
    assert case.first_response_due == NOW + 4 * HOUR
    assert case.resolution_due == NOW + 48 * HOUR
    assert case.deadline == case.first_response_due  # nobody has answered yet


def test_opening_the_same_case_again_changes_nothing() -> None:
    case = complaint()
    cmd = Open("case-1", domain.RISK_ALERT, domain.HIGH, NOW, RULES)
    assert domain.open_case(case, cmd) == []


def filed(order_id: str = "o-1", text_sha256: str = "d1", complainant: str = "CONSUMER") -> Open:
    case_id = domain.complaint_case_id("jd", "c-42")
    return Open(
        case_id,
        domain.COMPLAINT,
        domain.NORMAL,
        NOW,
        RULES,
        "jd",
        order_id,
        complainant,
        text_sha256=text_sha256,
    )


def test_a_complaint_filed_again_under_its_id_is_the_same_case_and_opens_nothing() -> None:
    case = play(None, domain.file_complaint(None, filed()))
    assert case is not None and case.case_id == domain.complaint_case_id("jd", "c-42")
    assert case.text_sha256 == "d1"
    assert domain.file_complaint(case, filed()) == []  # the platform's retry


@pytest.mark.parametrize(
    "other",
    [filed(order_id="o-2"), filed(text_sha256="d2"), filed(complainant="MERCHANT")],
    ids=["another order", "another text", "another complainant"],
)
def test_a_complaint_id_reused_for_a_different_complaint_is_refused(other: Open) -> None:
    case = play(None, domain.file_complaint(None, filed()))
    with pytest.raises(AlreadyExists) as refused:
        domain.file_complaint(case, other)
    assert (refused.value.reason, refused.value.field) == ("COMPLAINT_ID_REUSED", "complaint_id")


def test_complaint_ids_are_per_platform() -> None:
    assert domain.complaint_case_id("jd", "c-1") != domain.complaint_case_id("taobao", "c-1")
    assert domain.complaint_case_id("jd", "c-1") == domain.complaint_case_id("jd", "c-1")


def test_an_assignment_or_a_note_is_the_first_response() -> None:
    case = complaint()
    assigned = play(case, domain.assign(case, Assign("li", NOW + HOUR)))
    assert assigned is not None and assigned.responded and assigned.assignee == "li"
    assert assigned.deadline == case.resolution_due
    assert domain.assign(assigned, Assign("li", NOW + 2 * HOUR)) == []  # the same person again
    noted = play(case, domain.note(case, Note(b"sealed", "ab" * 32, 10, NOW + HOUR)))
    assert noted is not None and noted.responded and noted.notes == 1


def test_a_resolution_is_recorded_once() -> None:
    case = complaint()
    cmd = Resolve(domain.RESTORE_QUALIFICATION, "li", NOW + HOUR, qualification_id="q-1")
    [event] = domain.resolve(case, cmd)
    assert isinstance(event, ev.CaseResolved)
    assert (event.outcome, event.qualification_id, event.order_id) == (
        domain.RESTORE_QUALIFICATION,
        "q-1",
        "o-1",
    )
    resolved = play(case, [event])
    assert resolved is not None and resolved.status == domain.RESOLVED
    with pytest.raises(FailedPrecondition) as err:
        domain.resolve(resolved, cmd)
    assert err.value.reason == "CASE_ALREADY_RESOLVED"
    with pytest.raises(FailedPrecondition):
        domain.assign(resolved, Assign("wang", NOW + 2 * HOUR))


def test_an_outcome_on_a_qualification_names_it() -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.resolve(complaint(), Resolve(domain.FORFEIT_QUALIFICATION, "li", NOW))
    assert err.value.field == "qualification_id"


def test_an_outcome_that_moves_money_waits_for_a_different_person() -> None:
    case = complaint()
    cmd = Resolve(domain.CLAWBACK, "li", NOW + HOUR, order_id="o-1", amount_fen=50_000)
    [proposed] = domain.resolve(case, cmd)
    assert isinstance(proposed, ev.CaseOutcomeProposed) and proposed.proposed_by == "li"
    waiting = play(case, [proposed])
    assert waiting is not None and waiting.status == domain.AWAITING_APPROVAL
    with pytest.raises(FailedPrecondition) as again:
        domain.resolve(waiting, cmd)
    assert again.value.reason == "CASE_AWAITING_APPROVAL"
    with pytest.raises(PermissionDenied) as same:
        domain.approve(waiting, Approve("li", NOW + 2 * HOUR))
    assert same.value.reason == "MAKER_CHECKER"
    [resolved] = domain.approve(waiting, Approve("wang", NOW + 2 * HOUR))
    assert isinstance(resolved, ev.CaseResolved)
    assert (resolved.outcome, resolved.amount_fen, resolved.proposed_by) == (
        domain.CLAWBACK,
        50_000,
        "li",
    )
    done = play(waiting, [resolved])
    assert done is not None and done.status == domain.RESOLVED
    with pytest.raises(FailedPrecondition):
        domain.approve(done, Approve("zhao", NOW + 3 * HOUR))


def test_a_money_outcome_needs_an_order_and_a_positive_amount() -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.resolve(complaint(), Resolve(domain.CLAWBACK, "li", NOW, order_id="o-1"))
    assert err.value.reason == "INVALID_AMOUNT"
    with pytest.raises(FailedPrecondition) as nothing:
        domain.approve(complaint(), Approve("wang", NOW))
    assert nothing.value.reason == "NOTHING_TO_APPROVE"


def test_each_deadline_raises_one_alert_and_only_once_it_has_passed() -> None:
    case = complaint()
    assert domain.overdue(case, NOW + 24 * HOUR - dt.timedelta(seconds=1)) == []
    [first] = domain.overdue(case, NOW + 24 * HOUR)
    assert isinstance(first, ev.CaseOverdue) and first.deadline == domain.FIRST_RESPONSE
    alerted = play(case, [first])
    assert alerted is not None
    assert domain.overdue(alerted, NOW + 25 * HOUR) == []  # raised once
    [late] = domain.overdue(alerted, NOW + 168 * HOUR)
    assert isinstance(late, ev.CaseOverdue) and late.deadline == domain.RESOLUTION
    assert late.due.ToDatetime(tzinfo=dt.UTC) == NOW + 168 * HOUR
    both = play(alerted, [late])
    assert both is not None and both.overdue == (domain.FIRST_RESPONSE, domain.RESOLUTION)
    assert domain.overdue(both, NOW + 1000 * HOUR) == []


def test_an_answered_case_raises_no_first_response_alert_and_a_resolved_one_none() -> None:
    case = complaint()
    answered = play(case, domain.assign(case, Assign("li", NOW + HOUR)))
    assert answered is not None
    assert domain.overdue(answered, NOW + 100 * HOUR) == []
    cmd = Resolve(domain.NO_ACTION, "li", NOW + 2 * HOUR)
    resolved = play(answered, domain.resolve(answered, cmd))
    assert domain.overdue(resolved, NOW + 1000 * HOUR) == []


def test_a_sweep_long_after_both_deadlines_raises_both_at_once() -> None:
    events = domain.overdue(complaint(), NOW + 1000 * HOUR)
    assert [e.deadline for e in events if isinstance(e, ev.CaseOverdue)] == [
        domain.FIRST_RESPONSE,
        domain.RESOLUTION,
    ]


def test_a_platform_sees_only_the_complaints_it_filed() -> None:
    case = complaint()
    assert domain.visible(case, "jd") == case
    assert domain.visible(case, "taobao") is None
    assert domain.visible(case, None) == case  # people see every case
    risk = play(None, domain.open_case(None, Open("risk-1", domain.RISK_ALERT, "HIGH", NOW, RULES)))
    assert domain.visible(risk, "jd") is None and domain.visible(risk, "") is None


def test_the_outcome_carried_out_is_linked_once() -> None:
    restored = "subsidy.v1.QualificationRestored"
    case = complaint()
    assert domain.applied(case, "eligibility", "e-0", restored) == []  # not resolved yet
    cmd = Resolve(domain.RESTORE_QUALIFICATION, "li", NOW, qualification_id="q-1")
    resolved = play(case, domain.resolve(case, cmd))
    assert domain.applied(resolved, "eligibility", "e-0", "subsidy.v1.RiskBlockLifted") == []
    [link] = domain.applied(resolved, "eligibility", "e-1", restored)
    linked = play(resolved, [link])
    assert linked is not None and linked.applied_event_id == "e-1"
    assert domain.applied(linked, "eligibility", "e-1", restored) == []
    assert domain.applied(linked, "eligibility", "e-2", restored) == []  # the first one stands
    assert domain.applied(None, "eligibility", "e-2", restored) == []


def test_many_overrides_by_one_person_open_a_case_once_at_the_limit() -> None:
    rules = Supervision(override_limit=3, override_window_hours=1)
    assert not domain.operator_case_due(2, rules, open_case=False)
    assert domain.operator_case_due(3, rules, open_case=False)
    assert not domain.operator_case_due(4, rules, open_case=True)  # one open case at a time


@pytest.mark.parametrize(
    "decide",
    [
        lambda: domain.assign(None, Assign("li", NOW)),
        lambda: domain.note(None, Note(b"", "", 0, NOW)),
        lambda: domain.resolve(None, Resolve(domain.NO_ACTION, "li", NOW)),
        lambda: domain.approve(None, Approve("wang", NOW)),
        lambda: domain.reveal(None, NOW),
    ],
)
def test_unknown_cases_are_not_found(decide: Callable[[], list[Message]]) -> None:
    with pytest.raises(NotFound) as err:
        decide()
    assert err.value.reason == "UNKNOWN_CASE"


def test_a_complaint_names_an_order_of_its_own_platform() -> None:
    domain.check_order("jd", "jd")
    for order_platform in (None, "taobao"):  # unknown, or another's: the same answer
        with pytest.raises(NotFound) as err:
            domain.check_order(order_platform, "jd")
        assert (err.value.reason, err.value.field) == ("UNKNOWN_ORDER", "order_id")


def test_a_finding_opens_one_case_per_key() -> None:
    key = "shared_serial/serial/IMEI-1/several orders"
    assert domain.finding_case_id(key) == domain.finding_case_id(key)
    assert domain.finding_case_id(key) != domain.finding_case_id(key + "x")
    assert len(domain.finding_case_id(key)) <= 80  # a case id the API accepts
