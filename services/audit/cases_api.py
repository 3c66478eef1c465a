"""The supervision cases' gRPC edge (CaseService): every request field is bounded here once.

Who may call each method is in the kernel's authorisation table; what a platform may see is
decided from its certificate (``identity.scope()``), never from a request field: a platform
files complaints as itself and reads only the cases it filed.
"""

from __future__ import annotations

from datetime import datetime

from services.kernel import validate
from services.kernel.errors import InvalidArgument, PermissionDenied
from services.kernel.identity import caller, scope
from services.kernel.rpc import ServicerContext
from subsidy.v1 import cases_pb2, cases_pb2_grpc

from . import cases_domain as domain
from . import reviews_domain
from .cases import CaseRow, Cases
from .reviews import MAX_SEED, Reviews, ReviewView

MAX_TEXT = 2000  # characters of a complaint or a note (the event stays far below the bus's cap)
MAX_PAGE = 500
MAX_ACTIONS = 1000
MAX_AMOUNT_FEN = 10**12
MAX_CASE_ID = 80


def free_text(field: str, value: str) -> str:
    """A person's words: required, at most :data:`MAX_TEXT` characters, line breaks and tabs
    allowed but no other control characters. Never logged: it may hold personal data."""
    value = value.strip()
    if not value:
        raise InvalidArgument("MISSING_FIELD", f"{field}: required", field=field)
    if len(value) > MAX_TEXT:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"{field}: at most {MAX_TEXT} characters", field=field
        )
    if any(ord(c) < 32 and c not in "\n\t" for c in value):
        raise InvalidArgument("INVALID_TEXT", f"{field}: control characters", field=field)
    return value


def _stamp(message: cases_pb2.Case, name: str, at: datetime) -> None:
    getattr(message, name).FromDatetime(at)


def case_message(row: CaseRow) -> cases_pb2.Case:
    """A case as the API shows it (texts only when revealed, by the caller)."""
    c = row.case
    message = cases_pb2.Case(
        case_id=c.case_id,
        kind=c.kind,
        priority=c.priority,
        status=c.status,
        platform_id=c.platform_id,
        order_id=c.order_id,
        complainant=c.complainant,
        assignee=c.assignee,
        outcome=c.outcome,
        qualification_id=c.qualification_id,
        amount_fen=c.amount_fen,
        proposed_by=c.proposed_by,
        resolved_by=row.resolved_by,
        overdue=list(c.overdue),
        applied_event_id=c.applied_event_id,
        subject=c.subject,
        summary=c.summary,
        text_length=c.text_length,
    )
    _stamp(message, "opened_at", c.opened_at)
    _stamp(message, "first_response_due", c.first_response_due)
    _stamp(message, "resolution_due", c.resolution_due)
    _stamp(message, "deadline", c.deadline)
    return message


def _case_id(value: str) -> str:
    return validate.identifier("case_id", value, max_len=MAX_CASE_ID)


def _action_message(out: cases_pb2.OperatorAction, row: dict[str, object]) -> None:
    """A recorded operator action (``operator_actions`` row) into ``out``."""
    out.event_id = str(row["event_id"])
    for name in ("service", "event_type", "stream_id", "role", "reason"):
        setattr(out, name, str(row.get(name) or ""))
    at = row.get("occurred_at")
    if isinstance(at, datetime):
        out.at.FromDatetime(at)


def review_message(view: ReviewView) -> cases_pb2.Review:
    """A review as the API shows it: the sample in draw order, each action with its verdict."""
    h = view.head
    message = cases_pb2.Review(
        review_id=str(h["review_id"]),
        reviewer=str(h["reviewer"]),
        operator=str(h["operator"]),
        seed=int(str(h["seed"])),
        size=int(str(h["size"])),
        population=int(str(h["population"])),
        population_last_event_id=str(h["population_last_event_id"]),
        pending=sum(1 for a in view.actions if not a.verdict),
    )
    at = h["sampled_at"]
    assert isinstance(at, datetime)
    message.sampled_at.FromDatetime(at)
    for a in view.actions:
        sampled = message.actions.add(
            operator=str(a.action.get("operator") or ""), verdict=a.verdict, case_id=a.case_id
        )
        _action_message(sampled.action, a.action)
    return message


def _review_id(value: str) -> str:
    return validate.identifier("review_id", value, max_len=MAX_CASE_ID)


class CasesApi(cases_pb2_grpc.CaseServiceServicer):
    def __init__(self, cases: Cases) -> None:
        self.cases = cases
        self.reviews = Reviews(cases.store, cases)

    async def _answer(self, case_id: str) -> cases_pb2.Case:
        return case_message(await self.cases.get(case_id, None))

    async def FileComplaint(
        self, request: cases_pb2.FileComplaintRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        own = scope()
        if own is not None:  # a platform files as itself; naming another is refused
            if request.platform_id and request.platform_id != own:
                raise PermissionDenied(
                    "NOT_YOUR_PLATFORM",
                    f"platform_id: the caller's certificate is platform {own!r}'s",
                    field="platform_id",
                )
            platform_id = own
        else:
            platform_id = validate.identifier("platform_id", request.platform_id)
        order_id = validate.identifier("order_id", request.order_id)
        complainant = validate.choice(
            "complainant", request.complainant or domain.CONSUMER, domain.COMPLAINANTS
        )
        text = free_text("text", request.text)
        complaint_id = (
            validate.identifier("complaint_id", request.complaint_id)
            if request.complaint_id
            else ""
        )
        case = await self.cases.file_complaint(
            platform_id, order_id, text, complainant, caller().actor(), complaint_id
        )
        return case_message(CaseRow(case, ""))

    async def GetCase(
        self, request: cases_pb2.GetCaseRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        case_id = _case_id(request.case_id)
        platform = scope()
        if request.reveal_text and platform is not None:
            raise PermissionDenied(
                "REVEAL_NOT_ALLOWED", "reveal_text: people only", field="reveal_text"
            )
        message = case_message(await self.cases.get(case_id, platform))
        if platform is not None:  # the campaign's staff stay internal: a platform sees no names
            for name in ("assignee", "proposed_by", "resolved_by"):
                message.ClearField(name)
        elif request.reveal_text:
            revealed = await self.cases.reveal(case_id, caller().actor())
            message.text = revealed.text
            for author, at, text in revealed.notes:
                note = message.notes.add(author=author, text_length=len(text), text=text)
                note.at.FromDatetime(at)
        else:
            for author, at, length in await self.cases.notes(case_id):
                note = message.notes.add(author=author, text_length=length)
                note.at.FromDatetime(at)
        return message

    async def ListCases(
        self, request: cases_pb2.ListCasesRequest, context: ServicerContext
    ) -> cases_pb2.ListCasesResponse:
        status = validate.choice("status", request.status, ("", *domain.STATUSES))
        if not 0 <= request.limit <= MAX_PAGE:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 0..{MAX_PAGE}", field="limit")
        rows = await self.cases.listed(status, request.limit or MAX_PAGE)
        return cases_pb2.ListCasesResponse(cases=[case_message(r) for r in rows])

    async def AssignCase(
        self, request: cases_pb2.AssignCaseRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        case_id = _case_id(request.case_id)
        assignee = validate.identifier("assignee", request.assignee)
        reason = validate.text_field("reason", request.reason, required=False)
        await self.cases.assign(case_id, assignee, caller().actor(reason))
        return await self._answer(case_id)

    async def AddCaseNote(
        self, request: cases_pb2.AddCaseNoteRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        case_id = _case_id(request.case_id)
        text = free_text("text", request.text)
        await self.cases.note(case_id, text, caller().actor())
        return await self._answer(case_id)

    async def ResolveCase(
        self, request: cases_pb2.ResolveCaseRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        case_id = _case_id(request.case_id)
        outcome = validate.choice("outcome", request.outcome, domain.OUTCOMES)
        reason = validate.text_field("reason", request.reason)
        qid = (
            validate.identifier("qualification_id", request.qualification_id)
            if request.qualification_id
            else ""
        )
        order_id = validate.identifier("order_id", request.order_id) if request.order_id else ""
        if not 0 <= request.amount_fen <= MAX_AMOUNT_FEN:
            raise InvalidArgument(
                "INVALID_AMOUNT", f"amount_fen: 0..{MAX_AMOUNT_FEN}", field="amount_fen"
            )
        await self.cases.resolve(
            case_id,
            outcome,
            caller().actor(reason),
            qualification_id=qid,
            order_id=order_id,
            amount_fen=request.amount_fen,
        )
        return await self._answer(case_id)

    async def ApproveCaseOutcome(
        self, request: cases_pb2.ApproveCaseOutcomeRequest, context: ServicerContext
    ) -> cases_pb2.Case:
        case_id = _case_id(request.case_id)
        reason = validate.text_field("reason", request.reason)
        await self.cases.approve(case_id, caller().actor(reason))
        return await self._answer(case_id)

    async def ListOperatorActions(
        self, request: cases_pb2.ListOperatorActionsRequest, context: ServicerContext
    ) -> cases_pb2.ListOperatorActionsResponse:
        operator = validate.identifier("operator", request.operator)
        if not 0 <= request.limit <= MAX_ACTIONS:
            raise InvalidArgument("INVALID_LIMIT", f"limit: 0..{MAX_ACTIONS}", field="limit")
        out = cases_pb2.ListOperatorActionsResponse()
        for row in await self.cases.operator_actions(operator, request.limit or MAX_ACTIONS):
            action = out.actions.add(
                event_id=str(row["event_id"]),
                service=str(row["service"]),
                event_type=str(row["event_type"]),
                stream_id=str(row["stream_id"]),
                role=str(row["role"]),
                reason=str(row["reason"]),
            )
            at = row["occurred_at"]
            assert isinstance(at, datetime)
            action.at.FromDatetime(at)
        return out

    async def SampleOperatorActions(
        self, request: cases_pb2.SampleOperatorActionsRequest, context: ServicerContext
    ) -> cases_pb2.Review:
        if not 1 <= request.size <= reviews_domain.MAX_SAMPLE:
            raise InvalidArgument(
                "INVALID_SIZE", f"size: 1..{reviews_domain.MAX_SAMPLE}", field="size"
            )
        operator = validate.identifier("operator", request.operator) if request.operator else ""
        seed = request.seed if request.HasField("seed") else None
        if seed is not None and seed > MAX_SEED:
            raise InvalidArgument("INVALID_SEED", f"seed: 0..{MAX_SEED}", field="seed")
        reason = validate.text_field("reason", request.reason, required=False)
        review_id = await self.reviews.sample(request.size, operator, seed, caller().actor(reason))
        return review_message(await self.reviews.get(review_id))

    async def ReviewOperatorAction(
        self, request: cases_pb2.ReviewOperatorActionRequest, context: ServicerContext
    ) -> cases_pb2.Review:
        review_id = _review_id(request.review_id)
        event_id = validate.identifier("event_id", request.event_id, max_len=36)
        verdict = validate.choice("verdict", request.verdict, reviews_domain.VERDICTS)
        if verdict == reviews_domain.FLAGGED:
            note = free_text("note", request.note)
        elif request.note:
            raise InvalidArgument(
                "NOTE_NOT_ALLOWED", "note: only a flag takes a note (OK: use reason)", field="note"
            )
        else:
            note = ""
        reason = validate.text_field("reason", request.reason, required=False)
        await self.reviews.mark(review_id, event_id, verdict, note, caller().actor(reason))
        return review_message(await self.reviews.get(review_id))

    async def GetReview(
        self, request: cases_pb2.GetReviewRequest, context: ServicerContext
    ) -> cases_pb2.Review:
        return review_message(await self.reviews.get(_review_id(request.review_id)))
