"""The authorisation table covers every RPC there is, and nothing else (no real stack needed)."""

from __future__ import annotations

from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.kernel import authz
from services.kernel.identity import Caller, NotAnIdentity, Role
from subsidy.v1 import (
    audit_pb2,
    cases_pb2,
    catalog_pb2,
    eligibility_pb2,
    eventlog_pb2,
    identity_pb2,
    ledger_pb2,
    outbox_pb2,
    risk_pb2,
    usage_pb2,
)

FILES: tuple[FileDescriptor, ...] = (
    catalog_pb2.DESCRIPTOR,
    eligibility_pb2.DESCRIPTOR,
    ledger_pb2.DESCRIPTOR,
    audit_pb2.DESCRIPTOR,
    cases_pb2.DESCRIPTOR,
    eventlog_pb2.DESCRIPTOR,
    outbox_pb2.DESCRIPTOR,
    risk_pb2.DESCRIPTOR,
    identity_pb2.DESCRIPTOR,
    usage_pb2.DESCRIPTOR,
    health_pb2.DESCRIPTOR,
    reflection_pb2.DESCRIPTOR,
)


def every_method() -> set[str]:
    """Every method of every service the platform's servers register, as gRPC names it."""
    return {
        f"/{service.full_name}/{method.name}"
        for file in FILES
        for service in file.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_has_an_entry_and_every_entry_is_an_rpc() -> None:
    methods = every_method()
    missing = methods - authz.RULES.keys()
    assert not missing, f"RPCs nobody may call until the table names them: {sorted(missing)}"
    stale = (
        authz.RULES.keys()
        - methods
        - {
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"  # the newer reflection name
        }
    )
    assert not stale, f"table entries for RPCs that do not exist: {sorted(stale)}"


def test_a_method_missing_from_the_table_is_refused_for_everyone() -> None:
    for role in Role:
        assert not authz.allowed("/subsidy.v1.LedgerService/DrainThePool", Caller(role, "x"))


def test_roles_and_single_callers() -> None:
    verify = "/subsidy.v1.CatalogService/VerifyItem"
    assert authz.allowed(verify, Caller(Role.SERVICE, "ledger"))
    assert not authz.allowed(verify, Caller(Role.SERVICE, "audit"))  # a service, but not ledger
    assert not authz.allowed(verify, Caller(Role.PLATFORM, "jd"))
    propose = "/subsidy.v1.LedgerService/ProposeFunding"
    approve_funding = "/subsidy.v1.LedgerService/ApproveFunding"
    assert not authz.allowed(propose, Caller(Role.PLATFORM, "jd"))
    assert authz.allowed(propose, Caller(Role.OPERATOR, "li"))
    assert not authz.allowed(approve_funding, Caller(Role.OPERATOR, "li"))
    assert authz.allowed(approve_funding, Caller(Role.APPROVER, "wang"))
    lock = "/subsidy.v1.EligibilityService/LockQualification"
    assert not authz.allowed(lock, Caller(Role.PLATFORM, "jd"))
    approve = "/subsidy.v1.CatalogService/ApprovePolicy"
    assert authz.allowed(approve, Caller(Role.APPROVER, "wang"))
    assert not authz.allowed(approve, Caller(Role.OPERATOR, "li"))
    for method in every_method():
        if method.startswith(("/subsidy.v1.AuditService/", "/grpc.")):
            continue
        auditor_may = authz.allowed(method, Caller(Role.AUDITOR, "zhao"))
        name = method.rsplit("/", 1)[-1]
        assert not auditor_may or name.startswith(("Get", "List", "Quote", "Export")), (
            f"the auditor is read-only, but may call {method}"
        )


def test_only_this_campaigns_spiffe_ids_are_callers() -> None:
    assert Caller.parse("spiffe://subsidy.local/platform/jd") == Caller(Role.PLATFORM, "jd")
    for bad in (
        "spiffe://evil.example/platform/jd",
        "spiffe://subsidy.local/root/jd",
        "spiffe://subsidy.local/platform/",
        "spiffe://subsidy.local/platform/JD",
        "spiffe://subsidy.local/platform/jd/extra",
        "https://subsidy.local/platform/jd",
    ):
        try:
            Caller.parse(bad)
        except NotAnIdentity:
            continue
        raise AssertionError(f"accepted {bad!r}")
