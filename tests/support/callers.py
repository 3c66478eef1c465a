"""Test callers with real certificates: every call a test makes presents an identity.

The services decide who calls from the client certificate alone. Tests that act as several
people and platforms (an operator drafts, an approver approves, platform A checks out) get a
:class:`CallerRouter`: a channel that, for each call, presents the certificate of the caller the
request stands for (its ``actor`` field, else its ``platform_id`` / ``channel``, else the
method's usual caller), issued once per identity by the test OpenBao's PKI. The router only
chooses which real certificate to present; the server verifies it and ignores request fields.
A test that wants one fixed identity uses :meth:`CallerRouter.as_caller`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import hvac

from services.kernel import pki, rpc, tls
from services.kernel.identity import Caller, Role
from subsidy.v1 import common_pb2

_KIND_ROLE = {
    common_pb2.Actor.KIND_PLATFORM: Role.PLATFORM,
    common_pb2.Actor.KIND_OPERATOR: Role.OPERATOR,
    common_pb2.Actor.KIND_APPROVER: Role.APPROVER,
    common_pb2.Actor.KIND_AUDITOR: Role.AUDITOR,
    common_pb2.Actor.KIND_SERVICE: Role.SERVICE,
}
OPERATOR = Caller(Role.OPERATOR, "ops")
LEDGER = Caller(Role.SERVICE, "ledger")
ELIGIBILITY = Caller(Role.SERVICE, "eligibility")
AUDITOR = Caller(Role.AUDITOR, "audit")
APPROVER = Caller(Role.APPROVER, "checker")

# Who usually makes each call when the request names nobody.
_PLATFORM_METHODS = (
    "LedgerService/ReserveSubsidy",
    "LedgerService/CaptureSubsidy",
    "LedgerService/ReleaseSubsidy",
    "LedgerService/GetReservation",
    "LedgerService/RecordEvidence",
    "EligibilityService/RegisterConsumer",
    "EligibilityService/ClaimQualification",
    "EligibilityService/GetQualification",
    "EligibilityService/ConsumeQualification",
    "EligibilityService/AddIdentifiers",
)
_DEFAULTS: dict[str, Caller] = {
    "CatalogService/VerifyItem": LEDGER,
    "EligibilityService/LockQualification": LEDGER,
    "IdentityAuthority/VerifyThreeFactors": ELIGIBILITY,
    "CatalogService/ReviewMerchant": APPROVER,
    "CatalogService/ApprovePolicy": APPROVER,
    "LedgerService/ApproveFunding": APPROVER,
    "LedgerService/GetFundingProposal": APPROVER,
    "LedgerService/ApproveSettlementBatch": APPROVER,
    "AuditService/GetLogInfo": AUDITOR,
    "AuditService/GetEntries": AUDITOR,
    "AuditService/GetCheckpoint": AUDITOR,
    "AuditService/GetInclusionProof": AUDITOR,
    "AuditService/GetConsistencyProof": AUDITOR,
    "AuditService/ListOrderEntries": AUDITOR,
    "UsageService/ListQuotaUsage": AUDITOR,
    "UsageService/ListPersonUsage": AUDITOR,
    "EventLogService/ListEvents": AUDITOR,
}


def _name(value: str) -> str:
    """A request's id as a SPIFFE name (lower case; anything else becomes ``-``)."""
    cleaned = re.sub(r"[^a-z0-9._-]", "-", value.lower()).strip("-.") or "unknown"
    return cleaned[:63]


def caller_for(method: str, request: Any) -> Caller:
    """The caller a test's request stands for."""
    actor = getattr(request, "actor", None)
    if actor is not None and actor.kind in _KIND_ROLE:
        return Caller(_KIND_ROLE[actor.kind], _name(actor.id or "unknown"))
    short = method.removeprefix("/subsidy.v1.")
    if short in _DEFAULTS:
        return _DEFAULTS[short]
    if short in _PLATFORM_METHODS:
        platform = getattr(request, "platform_id", "") or getattr(request, "channel", "")
        return Caller(Role.PLATFORM, _name(platform or "jd"))
    return OPERATOR


class Identities:
    """Certificates for test callers, issued by the test OpenBao's PKI (once each)."""

    def __init__(self, vault_addr: str, token: str, *, ttl: str = "2h") -> None:
        self._client = hvac.Client(url=vault_addr, token=token, timeout=10)
        pki.ensure_pki(self._client)
        self._ttl = ttl
        self._sources: dict[Caller, tls.CertificateSource] = {}

    def __call__(self, who: Caller) -> tls.CertificateSource:
        if who not in self._sources:
            issue = self.issuer(who, self._ttl)
            self._sources[who] = tls.VaultCertificates(issue)
        return self._sources[who]

    def issuer(self, who: Caller, ttl: str) -> Callable[[], tls.Certificate]:
        # A service's certificate also serves: it names the loopback address clients dial.
        names = (
            {"dns_names": ["localhost"], "ip_sans": ["127.0.0.1"]} if who.role == "service" else {}
        )
        return lambda: pki.issue(self._client, who, ttl=ttl, **names)


class CallerRouter(rpc.RoutedChannel[Caller]):
    """A channel to one server that presents, per call, the certificate of the caller the
    request stands for (see the module docstring)."""

    def __init__(
        self,
        target: str,
        identities: Identities,
        *,
        deadline_s: float = 10.0,
        choose: Callable[[str, Any], Caller] = caller_for,
    ) -> None:
        super().__init__(target, identities, choose, OPERATOR, deadline_s=deadline_s)
        self._identities = identities

    def as_caller(self, who: Caller) -> CallerRouter:
        """The same server, every call as ``who``."""
        return CallerRouter(
            self.target, self._identities, deadline_s=self._deadline_s, choose=lambda m, r: who
        )
