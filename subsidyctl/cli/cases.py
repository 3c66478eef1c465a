"""Supervision cases from the command line, against the running audit service (which keeps them),
and complaints as a platform files them.

  subsidyctl cases list [--status OPEN] [--json]          one JSON object per case
  subsidyctl cases show CASE_ID [--reveal]                one case (--reveal: its texts)
  subsidyctl cases assign CASE_ID --to NAME [--reason TEXT]
  subsidyctl cases note CASE_ID --text TEXT
  subsidyctl cases resolve CASE_ID --outcome OUTCOME --reason TEXT
                          [--qualification ID] [--order ID --amount-fen N]
  subsidyctl cases apply CASE_ID                          carry a resolved outcome out again
  subsidyctl cases approve CASE_ID --reason TEXT          (the checker of a money outcome)
  subsidyctl cases operator-actions --operator NAME       every action of one person
  subsidyctl cases review-sample --size N [--operator NAME] [--seed S]
                                                          a supervisor (approver) draws a sample
  subsidyctl cases review-mark REVIEW_ID EVENT_ID --ok | --flag --note TEXT
  subsidyctl cases review-show REVIEW_ID                  the sample and its verdicts
  subsidyctl complaint file --order ORDER_ID --text TEXT  (as the demo platform)

``resolve`` records the outcome with the audit service; for RESTORE_QUALIFICATION and
FORFEIT_QUALIFICATION it then asks eligibility (the owner of qualifications) to carry it out,
naming the case, and for LIFT_BLOCK on a risk alert to lift the block the alert is about;
eligibility's event is linked back to the case. If that second call fails, ``cases apply
CASE_ID`` repeats it (eligibility does nothing the second time for a qualification). Outcomes
that move money (CLAWBACK, CORRECT_RECONCILIATION) are proposed and wait for ``cases approve`` by
a different person; they, LIFT_BLOCK on other cases, ADD_BLOCK and SUSPEND_MERCHANT are recorded
for the owning service's operators to act on (docs/cases.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format

from services.kernel import rpc, tls
from subsidy.v1 import (
    cases_pb2,
    cases_pb2_grpc,
    eligibility_pb2,
    eligibility_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
)

from ..stack.certs import APPROVER_DEMO, AUDITOR_DEMO, OPERATOR_DEMO, PLATFORM_DEMO
from .common import (
    ApproverIdentityOpt,
    AuditorIdentityOpt,
    Failure,
    JsonOpt,
    OperatorIdentityOpt,
    PlatformIdentityOpt,
    ReasonOpt,
    emit,
    identity,
    local_address,
    note,
)

T = TypeVar("T")
AuditOpt = Annotated[str, typer.Option(help="audit service HOST:PORT (default: the local stack's)")]
EligibilityOpt = Annotated[
    str, typer.Option(help="eligibility service HOST:PORT (default: the local stack's)")
]
PANEL = "Supervision"
app = typer.Typer(
    name="cases",
    help="Supervision cases: complaints, risk alerts, operator activity; list, assign, resolve.",
    no_args_is_help=True,
)
complaint_app = typer.Typer(
    name="complaint", help="File a complaint about an order, as a platform.", no_args_is_help=True
)
ON_QUALIFICATION = ("RESTORE_QUALIFICATION", "FORFEIT_QUALIFICATION")


def _call(
    address: str,
    service: str,
    who: tls.CertificateSource,
    call: Callable[[grpc.aio.Channel], Awaitable[T]],
) -> T:
    async def go() -> T:
        channel = rpc.channel(address or local_address(service), who, deadline_s=10)
        try:
            return await call(channel)
        finally:
            await channel.close()

    return asyncio.run(go())


def cases_call(
    address: str,
    who: tls.CertificateSource,
    call: Callable[[cases_pb2_grpc.CaseServiceAsyncStub], Awaitable[T]],
) -> T:
    """Run ``call`` as ``who`` against the audit service's CaseService (a failure propagates;
    cli.main prints it)."""
    return _call(address, "audit", who, lambda ch: call(cases_pb2_grpc.CaseServiceStub(ch)))


def plain(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def summary(case: cases_pb2.Case) -> dict[str, Any]:
    """A case as ``list`` prints it: at least its id, type, status and next deadline."""
    return {
        "case_id": case.case_id,
        "type": case.kind,
        "status": case.status,
        "deadline": case.deadline.ToDatetime().isoformat() + "Z",
        "priority": case.priority,
        "assignee": case.assignee,
        "platform_id": case.platform_id,
        "order_id": case.order_id,
        "outcome": case.outcome,
        "overdue": list(case.overdue),
        "summary": case.summary,
    }


def shown(case: cases_pb2.Case) -> dict[str, Any]:
    """A case as ``show`` prints it: every field, with ``type`` as ``list`` names it."""
    return plain(case) | {"type": case.kind, "deadline": summary(case)["deadline"]}


@app.command("list")
def list_cases(
    status: Annotated[str, typer.Option(help="OPEN, AWAITING_APPROVAL or RESOLVED")] = "",
    limit: Annotated[int, typer.Option(min=0, max=500, help="at most this many")] = 0,
    audit: AuditOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Every case (oldest first): one JSON object per line."""
    who = identity(identity_dir, OPERATOR_DEMO)
    got = cases_call(
        audit, who, lambda s: s.ListCases(cases_pb2.ListCasesRequest(status=status, limit=limit))
    )
    for case in got.cases:
        emit(summary(case))
    if not json_only and not got.cases:
        note("no cases")


@app.command()
def show(
    case_id: str,
    reveal: Annotated[
        bool, typer.Option(help="decrypt the complaint's and the notes' texts (recorded)")
    ] = False,
    audit: AuditOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """One case, with its notes (their texts only with --reveal)."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = cases_pb2.GetCaseRequest(case_id=case_id, reveal_text=reveal)
    emit(shown(cases_call(audit, who, lambda s: s.GetCase(request))))


@app.command()
def assign(
    case_id: str,
    to: Annotated[str, typer.Option("--to", help="the operator who takes the case")],
    reason: Annotated[str, typer.Option(help="why; kept with the event")] = "",
    audit: AuditOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Give the case to an operator (the first response, if it is the first)."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = cases_pb2.AssignCaseRequest(case_id=case_id, assignee=to, reason=reason)
    emit(summary(cases_call(audit, who, lambda s: s.AssignCase(request))))


@app.command("note")
def add_note(
    case_id: str,
    text: Annotated[str, typer.Option(help="the note (sealed; at most 2,000 characters)")],
    audit: AuditOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Add a note to the case (kept encrypted under the case's own key)."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = cases_pb2.AddCaseNoteRequest(case_id=case_id, text=text)
    emit(summary(cases_call(audit, who, lambda s: s.AddCaseNote(request))))


def acts(case: cases_pb2.Case) -> bool:
    """Whether eligibility carries the case's resolved outcome out (else it is recorded)."""
    if case.status != "RESOLVED":
        return False
    return case.outcome in ON_QUALIFICATION or (
        case.outcome == "LIFT_BLOCK" and case.kind == "RISK_ALERT"
    )


def _carry_out(
    case: cases_pb2.Case, eligibility: str, who: tls.CertificateSource, reason: str
) -> dict[str, Any]:
    """Ask eligibility to carry the outcome out: restore or forfeit the case's qualification
    (naming the case), or lift the block a risk-alert case is about (its decision)."""
    if case.outcome == "LIFT_BLOCK":
        lift = risk_pb2.LiftBlockRequest(decision_id=case.subject, reason=reason)
        decision = _call(
            eligibility,
            "eligibility",
            who,
            lambda ch: risk_pb2_grpc.RiskServiceStub(ch).LiftBlock(lift),
        )
        return {"decision": {"decision_id": decision.decision_id, "status": decision.status}}
    request = eligibility_pb2.CaseQualificationRequest(
        qualification_id=case.qualification_id, case_id=case.case_id, reason=reason
    )

    async def call(channel: grpc.aio.Channel) -> eligibility_pb2.Qualification:
        stub = eligibility_pb2_grpc.EligibilityServiceStub(channel)
        if case.outcome == "RESTORE_QUALIFICATION":
            return await stub.RestoreQualification(request)
        return await stub.ForfeitQualification(request)

    q = _call(eligibility, "eligibility", who, call)
    return {"qualification": {"qualification_id": q.qualification_id, "status": q.status}}


@app.command()
def resolve(
    case_id: str,
    outcome: Annotated[str, typer.Option(help="NO_ACTION, RESTORE_QUALIFICATION, ...")],
    reason: ReasonOpt,
    qualification: Annotated[
        str, typer.Option(help="the qualification (RESTORE_/FORFEIT_QUALIFICATION)")
    ] = "",
    order: Annotated[str, typer.Option(help="the order (CLAWBACK, ...)")] = "",
    amount_fen: Annotated[int, typer.Option(min=0, help="the amount (CLAWBACK, ...)")] = 0,
    audit: AuditOpt = "",
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Resolve the case with an outcome (once); a qualification outcome is then carried out by
    eligibility, a money outcome waits for a second person's approval."""
    who = identity(identity_dir, OPERATOR_DEMO)
    request = cases_pb2.ResolveCaseRequest(
        case_id=case_id,
        outcome=outcome,
        reason=reason,
        qualification_id=qualification,
        order_id=order,
        amount_fen=amount_fen,
    )
    case = cases_call(audit, who, lambda s: s.ResolveCase(request))
    out = summary(case)
    if acts(case):
        out |= _carry_out(case, eligibility, who, reason)
    emit(out)


@app.command()
def apply(
    case_id: str,
    reason: Annotated[str, typer.Option(help="why (default: the case's outcome)")] = "",
    audit: AuditOpt = "",
    eligibility: EligibilityOpt = "",
    identity_dir: OperatorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Carry a resolved qualification outcome out again (after ``resolve``'s second call
    failed); eligibility changes nothing if it was carried out already."""
    who = identity(identity_dir, OPERATOR_DEMO)
    case = cases_call(audit, who, lambda s: s.GetCase(cases_pb2.GetCaseRequest(case_id=case_id)))
    if not acts(case):
        raise Failure(f"case {case_id} has no resolved outcome eligibility carries out")
    emit(summary(case) | _carry_out(case, eligibility, who, reason or case.outcome))


@app.command()
def approve(
    case_id: str,
    reason: ReasonOpt,
    audit: AuditOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Approve the money outcome another person proposed (maker-checker)."""
    who = identity(identity_dir, APPROVER_DEMO)
    request = cases_pb2.ApproveCaseOutcomeRequest(case_id=case_id, reason=reason)
    emit(summary(cases_call(audit, who, lambda s: s.ApproveCaseOutcome(request))))


@app.command("operator-actions")
def operator_actions(
    operator: Annotated[str, typer.Option(help="the person's name (their certificate's)")],
    limit: Annotated[int, typer.Option(min=0, max=1000, help="the newest this many")] = 0,
    audit: AuditOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Every action of one person (who, what, when, why), oldest first: one JSON object each."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = cases_pb2.ListOperatorActionsRequest(operator=operator, limit=limit)
    got = cases_call(audit, who, lambda s: s.ListOperatorActions(request))
    for action in got.actions:
        emit(plain(action) | {"operator": operator})
    if not json_only and not got.actions:
        note(f"no actions of {operator}")


def review_shown(review: cases_pb2.Review) -> dict[str, Any]:
    """A review as ``review-*`` print it: every field (the seed as a number, not a string)."""
    return plain(review) | {"seed": review.seed, "pending": review.pending}


@app.command("review-sample")
def review_sample(
    size: Annotated[int, typer.Option(min=1, max=200, help="how many actions to draw")],
    operator: Annotated[
        str, typer.Option(help="only this person's actions (default: everyone's but yours)")
    ] = "",
    seed: Annotated[
        int | None, typer.Option(min=0, help="draw with this seed (default: a fresh random one)")
    ] = None,
    reason: Annotated[str, typer.Option(help="why this review (recorded)")] = "",
    audit: AuditOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Draw a reproducible random sample of recorded operator actions to review (supervisor:
    an approver); prints the review with its sampled actions."""
    who = identity(identity_dir, APPROVER_DEMO)
    request = cases_pb2.SampleOperatorActionsRequest(size=size, operator=operator, reason=reason)
    if seed is not None:
        request.seed = seed
    emit(review_shown(cases_call(audit, who, lambda s: s.SampleOperatorActions(request))))


@app.command("review-mark")
def review_mark(
    review_id: str,
    event_id: str,
    ok: Annotated[bool, typer.Option("--ok", help="reviewed: nothing wrong")] = False,
    flag: Annotated[bool, typer.Option("--flag", help="reviewed: flagged (opens a case)")] = False,
    note_text: Annotated[
        str, typer.Option("--note", help="why it is flagged (sealed in the case it opens)")
    ] = "",
    reason: Annotated[str, typer.Option(help="recorded with the verdict")] = "",
    audit: AuditOpt = "",
    identity_dir: ApproverIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """Mark one sampled action of a review reviewed: --ok, or --flag with a --note."""
    if ok == flag:
        raise Failure("give exactly one of --ok and --flag")
    who = identity(identity_dir, APPROVER_DEMO)
    request = cases_pb2.ReviewOperatorActionRequest(
        review_id=review_id,
        event_id=event_id,
        verdict="OK" if ok else "FLAGGED",
        note=note_text,
        reason=reason,
    )
    emit(review_shown(cases_call(audit, who, lambda s: s.ReviewOperatorAction(request))))


@app.command("review-show")
def review_show(
    review_id: str,
    audit: AuditOpt = "",
    identity_dir: AuditorIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """One review: who drew it, with which seed, and each sampled action with its verdict."""
    who = identity(identity_dir, AUDITOR_DEMO)
    request = cases_pb2.GetReviewRequest(review_id=review_id)
    emit(review_shown(cases_call(audit, who, lambda s: s.GetReview(request))))


@complaint_app.command("file")
def file_complaint(
    order: Annotated[str, typer.Option(help="the order complained about")],
    text: Annotated[str, typer.Option(help="the complaint (sealed; at most 2,000 characters)")],
    complainant: Annotated[str, typer.Option(help="CONSUMER or MERCHANT")] = "CONSUMER",
    complaint_id: Annotated[
        str, typer.Option(help="your id for it: filing again under it answers the same case")
    ] = "",
    audit: AuditOpt = "",
    identity_dir: PlatformIdentityOpt = None,
    json_only: JsonOpt = False,
) -> None:
    """File a complaint about an order as the platform the certificate names (the demo one)."""
    who = identity(identity_dir, PLATFORM_DEMO)
    request = cases_pb2.FileComplaintRequest(
        order_id=order, text=text, complainant=complainant, complaint_id=complaint_id
    )
    emit(summary(cases_call(audit, who, lambda s: s.FileComplaint(request))))
