"""Who may call what: one table for every RPC of every service, enforced before any handler.

Each entry names the principals allowed to call one method: a role (``platform``: every
platform) or one caller (``service/ledger``: the ledger only). A method missing from the table
is refused, so a new RPC cannot be exposed by accident (``tests/kernel/test_authz.py`` fails
when a service has a method the table does not name). What a platform may see *within* a
method it may call (only its own consumers, qualifications, orders and pools) is decided by the
use case from :func:`services.kernel.identity.caller`, never from a request field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import grpc

from .errors import DomainError, PermissionDenied
from .identity import Caller, NotAnIdentity, set_caller

PLATFORM: Final = "platform"
OPERATOR: Final = "operator"
APPROVER: Final = "approver"
AUDITOR: Final = "auditor"
SERVICE: Final = "service"
PEOPLE: Final = frozenset({OPERATOR, APPROVER, AUDITOR})
EVERYONE: Final = frozenset({PLATFORM, OPERATOR, APPROVER, AUDITOR, SERVICE})

_CATALOG = "/subsidy.v1.CatalogService/"
_ELIGIBILITY = "/subsidy.v1.EligibilityService/"
_LEDGER = "/subsidy.v1.LedgerService/"
_AUDIT = "/subsidy.v1.AuditService/"
_USAGE = "/subsidy.v1.UsageService/"
_IDENTITY = "/subsidy.v1.IdentityAuthority/"
_SIMULATOR = "/subsidy.v1.IdentitySimulatorAdmin/"
_EVENT_LOG = "/subsidy.v1.EventLogService/"
_RISK = "/subsidy.v1.RiskService/"
_CASES = "/subsidy.v1.CaseService/"

RULES: Final[Mapping[str, frozenset[str]]] = {
    # catalog: the policy (maker-checker: an operator drafts, a different approver approves)
    _CATALOG + "GetPolicy": EVERYONE,
    _CATALOG + "ListPolicies": EVERYONE,
    _CATALOG + "Quote": EVERYONE,
    _CATALOG + "DraftPolicy": frozenset({OPERATOR}),
    _CATALOG + "ApprovePolicy": frozenset({APPROVER}),
    # catalog: the emergency switches
    _CATALOG + "PauseCategory": frozenset({OPERATOR}),
    _CATALOG + "ResumeCategory": frozenset({OPERATOR}),
    _CATALOG + "PauseCampaign": frozenset({OPERATOR}),
    _CATALOG + "ResumeCampaign": frozenset({OPERATOR}),
    _CATALOG + "GetSwitches": EVERYONE,
    # catalog: merchants (a platform or an operator files, an approver reviews)
    _CATALOG + "ApplyMerchant": frozenset({PLATFORM, OPERATOR}),
    _CATALOG + "ReviewMerchant": frozenset({APPROVER}),
    _CATALOG + "SuspendMerchant": frozenset({OPERATOR}),
    _CATALOG + "ReinstateMerchant": frozenset({OPERATOR}),
    _CATALOG + "GetMerchant": frozenset({PLATFORM, *PEOPLE}),
    # catalog: products
    _CATALOG + "RegisterProduct": frozenset({PLATFORM, OPERATOR}),
    _CATALOG + "UpdatePrice": frozenset({OPERATOR}),  # the price baseline is the bureau's
    _CATALOG + "DelistProduct": frozenset({OPERATOR}),
    _CATALOG + "GetProduct": EVERYONE,
    _CATALOG + "GetPriceHistory": EVERYONE,
    _CATALOG + "ImportProducts": frozenset({OPERATOR}),
    # catalog: the checkout's item check is the ledger's, not a platform's
    _CATALOG + "VerifyItem": frozenset({"service/ledger"}),
    _CATALOG + "GetSalesLedger": frozenset({OPERATOR, AUDITOR}),
    _CATALOG + "ExportSalesLedger": frozenset({OPERATOR, AUDITOR}),
    # eligibility
    _ELIGIBILITY + "RegisterConsumer": frozenset({PLATFORM}),
    _ELIGIBILITY + "ClaimQualification": frozenset({PLATFORM}),
    _ELIGIBILITY + "GetQualification": frozenset({PLATFORM, OPERATOR, AUDITOR, SERVICE}),
    _ELIGIBILITY + "LockQualification": frozenset({"service/ledger"}),
    _ELIGIBILITY + "ConsumeQualification": frozenset({PLATFORM, "service/ledger"}),
    # eligibility: same user (a platform adds what it knows of its own consumers; operators and
    # auditors see why consumers are one person) and erasure (an operator, with a reason)
    _ELIGIBILITY + "AddIdentifiers": frozenset({PLATFORM}),
    _ELIGIBILITY + "GetPerson": frozenset({OPERATOR, AUDITOR}),
    _ELIGIBILITY + "EraseConsumer": frozenset({OPERATOR}),
    # eligibility: a supervision case's outcome, carried out by an operator (names the case)
    _ELIGIBILITY + "RestoreQualification": frozenset({OPERATOR}),
    _ELIGIBILITY + "ForfeitQualification": frozenset({OPERATOR}),
    # risk control, served by eligibility (maker-checker: an operator proposes, a different
    # approver approves; an operator lifts a block, with a reason)
    _RISK + "ProposeRules": frozenset({OPERATOR}),
    _RISK + "ProposeListChange": frozenset({OPERATOR}),
    _RISK + "ApproveChange": frozenset({APPROVER}),
    _RISK + "GetChange": frozenset(PEOPLE),
    _RISK + "ListRules": frozenset(PEOPLE),
    _RISK + "ListLists": frozenset(PEOPLE),
    _RISK + "ListDecisions": frozenset(PEOPLE),
    _RISK + "LiftBlock": frozenset({OPERATOR}),
    # ledger
    _LEDGER + "ProposeFunding": frozenset({OPERATOR}),
    _LEDGER + "ApproveFunding": frozenset({APPROVER}),
    _LEDGER + "GetFundingProposal": frozenset(PEOPLE),
    _LEDGER + "GetBudget": frozenset({PLATFORM, *PEOPLE}),
    _LEDGER + "ReserveSubsidy": frozenset({PLATFORM}),
    _LEDGER + "CaptureSubsidy": frozenset({PLATFORM}),
    _LEDGER + "ReleaseSubsidy": frozenset({PLATFORM}),
    _LEDGER + "GetReservation": frozenset({PLATFORM, OPERATOR, AUDITOR}),
    # ledger: discount-bill reconciliation (an operator imports the bill; auditors read)
    _LEDGER + "ReconcileDiscountBill": frozenset({OPERATOR}),
    _LEDGER + "ListReconciliations": frozenset({OPERATOR, AUDITOR}),
    _LEDGER + "GetReconciliation": frozenset({OPERATOR, AUDITOR}),
    _LEDGER + "RecordEvidence": frozenset({PLATFORM}),
    _LEDGER + "CreateSettlementBatch": frozenset({OPERATOR}),
    _LEDGER + "ApproveSettlementBatch": frozenset({APPROVER}),
    _LEDGER + "MarkSettlementBatchPaid": frozenset({OPERATOR}),
    _LEDGER + "GetSettlementBatch": frozenset({OPERATOR, APPROVER, AUDITOR}),
    _LEDGER + "ListSettlementBatches": frozenset({OPERATOR, AUDITOR}),
    _LEDGER + "ListOverdueEvidence": frozenset({OPERATOR, AUDITOR}),
    _LEDGER + "ListReturns": frozenset({OPERATOR, AUDITOR}),
    # ledger: the fund-detail ledger and the bureau's daily report (read-only)
    _LEDGER + "GetFundLedger": frozenset({OPERATOR, AUDITOR}),
    _LEDGER + "GetDailyReport": frozenset({OPERATOR, AUDITOR}),
    # audit: read-only, for the people who check the campaign
    _AUDIT + "GetLogInfo": frozenset({AUDITOR, OPERATOR}),
    _AUDIT + "GetEntries": frozenset({AUDITOR, OPERATOR}),
    _AUDIT + "GetCheckpoint": frozenset({AUDITOR, OPERATOR}),
    _AUDIT + "GetInclusionProof": frozenset({AUDITOR, OPERATOR}),
    _AUDIT + "GetConsistencyProof": frozenset({AUDITOR, OPERATOR}),
    _AUDIT + "ListOrderEntries": frozenset({AUDITOR, OPERATOR}),
    # audit: supervision cases (platforms file and follow their own complaints; a money
    # outcome is proposed by an operator and approved by a different approver)
    _CASES + "FileComplaint": frozenset({PLATFORM, OPERATOR}),
    _CASES + "GetCase": frozenset({PLATFORM, *PEOPLE}),
    _CASES + "ListCases": frozenset(PEOPLE),
    _CASES + "AssignCase": frozenset({OPERATOR}),
    _CASES + "AddCaseNote": frozenset({OPERATOR, APPROVER}),
    _CASES + "ResolveCase": frozenset({OPERATOR}),
    _CASES + "ApproveCaseOutcome": frozenset({APPROVER}),
    _CASES + "ListOperatorActions": frozenset({OPERATOR, APPROVER, AUDITOR}),
    # Supervisor reviews: approvers draw and mark them (docs/cases.md says why); auditors read.
    _CASES + "SampleOperatorActions": frozenset({APPROVER}),
    _CASES + "ReviewOperatorAction": frozenset({APPROVER}),
    _CASES + "GetReview": frozenset({APPROVER, AUDITOR}),
    # eligibility's issued quotas and per-person figures, for the auditor's replay to compare
    _USAGE + "ListQuotaUsage": frozenset({AUDITOR, OPERATOR}),
    _USAGE + "ListPersonUsage": frozenset({AUDITOR, OPERATOR}),
    # every service: its own event store, listed for the audit log's cross-check
    _EVENT_LOG + "ListEvents": frozenset({AUDITOR, OPERATOR}),
    # the identity authority (the simulator locally) answers eligibility only
    _IDENTITY + "VerifyThreeFactors": frozenset({"service/eligibility"}),
    _SIMULATOR + "Enroll": frozenset({OPERATOR}),
    # every service's outbox relay: its state, and the one way past an event the bus refuses
    "/subsidy.v1.OutboxService/GetOutboxStatus": frozenset({OPERATOR, AUDITOR}),
    "/subsidy.v1.OutboxService/SkipStuckEvent": frozenset({OPERATOR}),
    # and its consumers' dead letters: read and replayed by operators only
    "/subsidy.v1.OutboxService/ListDeadLetters": frozenset({OPERATOR}),
    "/subsidy.v1.OutboxService/GetDeadLetter": frozenset({OPERATOR}),
    "/subsidy.v1.OutboxService/ReplayDeadLetters": frozenset({OPERATOR}),
    # every server's health and (where enabled) reflection
    "/grpc.health.v1.Health/Check": EVERYONE,
    "/grpc.health.v1.Health/Watch": EVERYONE,
    "/grpc.health.v1.Health/List": EVERYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": EVERYONE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": EVERYONE,
}


def allowed(method: str, who: Caller, rules: Mapping[str, frozenset[str]] = RULES) -> bool:
    """Whether ``who`` may call ``method`` (a full method name, ``/package.Service/Method``)."""
    principals = rules.get(method)
    if principals is None:
        return False
    return who.role.value in principals or who.principal in principals


def authenticate(context: Any) -> Caller:
    """The caller the TLS handshake verified, from the call's auth context."""
    auth = context.auth_context()
    ids = auth.get("peer_spiffe_id") or []
    if len(ids) != 1:
        raise Unauthenticated("a client certificate with one SPIFFE id is required")
    try:
        return Caller.parse(bytes(ids[0]).decode("ascii", "replace"))
    except NotAnIdentity as exc:
        raise Unauthenticated(f"the certificate's identity is not recognised: {exc}") from None


class Unauthenticated(DomainError):
    """No verified identity comes with the call."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str) -> None:
        super().__init__("UNAUTHENTICATED", message)


def refusal(method: str, who: Caller) -> PermissionDenied:
    return PermissionDenied(
        "ROLE_NOT_ALLOWED",
        f"{who.role} {who.name!r} may not call {method.rsplit('/', 1)[-1]}",
        role=str(who.role),
    )


Handler = Any  # grpc.RpcMethodHandler: typed loosely, its four shapes differ


def guard(
    method: str,
    handler: Handler,
    reject: Callable[[Any, DomainError], Awaitable[None]],
    rules: Mapping[str, frozenset[str]] = RULES,
) -> Handler:
    """``handler`` with the identity check and the table's verdict in front of every shape of
    call (unary and streaming alike); ``reject`` aborts the call with the error's status."""

    def check(context: Any) -> DomainError | None:
        try:
            who = authenticate(context)
        except Unauthenticated as exc:
            return exc
        if not allowed(method, who, rules):
            return refusal(method, who)
        set_caller(who)
        return None

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            error = check(context)
            if error is not None:
                await reject(context, error)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            error = check(context)
            if error is not None:
                await reject(context, error)
            async for item in _iterate(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            error = check(context)
            if error is not None:
                await reject(context, error)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> Any:
        error = check(context)
        if error is not None:
            await reject(context, error)
        async for item in _iterate(inner_ss(requests, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


async def _iterate(produced: Any) -> Any:
    """A streaming handler returns an async iterator, or a coroutine that writes itself."""
    if hasattr(produced, "__aiter__"):
        async for item in produced:
            yield item
    else:
        await produced
