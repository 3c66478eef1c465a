"""The authorisation matrix: every RPC of every server × every kind of caller, on the real
in-process platform (four services and the identity simulator, mutual TLS, real stores).

Each RPC is called with an empty request of its input type. A caller the table
(services/kernel/authz.py) allows must get anything but ``PERMISSION_DENIED/ROLE_NOT_ALLOWED``
(the empty request is usually refused as invalid, which shows the call reached its handler); a
caller it does not allow gets exactly ``PERMISSION_DENIED/ROLE_NOT_ALLOWED``; a client without a
certificate, or with one from another CA, does not get past the TLS handshake (``UNAVAILABLE``).
The RPCs come from the generated descriptors, and each server's reflection must list no service
they do not describe, so a new RPC is in the matrix as soon as it is served; one without a table
entry fails here (and in tests/kernel/test_authz.py), and a real server refuses it to everyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.kernel import authz, rpc, topology
from services.kernel.identity import Caller, Role
from tests.e2e.conftest import Platform
from tests.kernel.test_authz import FILES
from tests.support.foreign_ca import foreign_certificate

CALLERS: tuple[Caller, ...] = (
    Caller(Role.PLATFORM, "jd"),
    Caller(Role.OPERATOR, "ops"),
    Caller(Role.APPROVER, "checker"),
    Caller(Role.AUDITOR, "audit"),
    Caller(Role.SERVICE, "ledger"),
    Caller(Role.SERVICE, "audit"),
    Caller(Role.SERVICE, "eligibility"),  # the one caller VerifyThreeFactors allows
)
SIMULATOR = topology.IDENTITY_SIMULATOR
# The server each service of the descriptors is served by; health and reflection by every one.
SERVED_BY: dict[str, tuple[str, ...]] = {
    "subsidy.v1.CatalogService": ("catalog",),
    "subsidy.v1.EligibilityService": ("eligibility",),
    "subsidy.v1.RiskService": ("eligibility",),  # risk control is eligibility's
    "subsidy.v1.LedgerService": ("ledger",),
    "subsidy.v1.AuditService": ("audit",),
    "subsidy.v1.CaseService": ("audit",),  # supervision cases are the audit service's
    "subsidy.v1.UsageService": ("eligibility",),
    # Every service lists its own event store (services/kernel/eventlog.py); the simulator
    # has none.
    "subsidy.v1.EventLogService": ("catalog", "eligibility", "ledger", "audit"),
    # Every service's outbox relay answers for itself (services/kernel/outbox.py).
    "subsidy.v1.OutboxService": ("catalog", "eligibility", "ledger", "audit"),
    "subsidy.v1.IdentityAuthority": (SIMULATOR,),
    "subsidy.v1.IdentitySimulatorAdmin": (SIMULATOR,),
}
EVERY_SERVER = ("catalog", "eligibility", "ledger", "audit", SIMULATOR)
EVERY_SERVER_SERVES = (
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
)
TIMEOUT_S = 10.0
Outcome = tuple[grpc.StatusCode, str]  # (code, ErrorInfo reason)


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def every_rpc() -> Iterator[tuple[str, MethodDescriptor]]:
    """(server, method) for every method of every service the descriptors describe."""
    for file in FILES:
        for service in file.services_by_name.values():
            servers = (
                EVERY_SERVER
                if service.full_name in EVERY_SERVER_SERVES
                else SERVED_BY.get(service.full_name)
            )
            assert servers, f"{service.full_name}: which server serves it? add it to SERVED_BY"
            for method in service.methods:
                for server in servers:
                    yield server, method


def addresses(platform: Platform) -> dict[str, str]:
    found = {name: f"127.0.0.1:{r.port}" for name, r in platform.running.items()}
    # The simulator is not one of the running services: eligibility is pointed at it.
    found[SIMULATOR] = platform.running["eligibility"].runtime.settings.peers[
        topology.IDENTITY_AUTHORITY
    ]
    assert set(found) == set(EVERY_SERVER), found
    return found


async def call_empty(channel: grpc.aio.Channel, method: MethodDescriptor) -> Outcome:
    """Call ``method`` with an empty request; for a stream read at most one message, then
    cancel (Health/Watch never ends)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    factories: dict[tuple[bool, bool], Callable[..., Any]] = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multi = factories[(method.client_streaming, method.server_streaming)](
        path_of(method),
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    request = iter([request_type()]) if method.client_streaming else request_type()
    call: Any = multi(request, timeout=TIMEOUT_S)
    try:
        if method.server_streaming:
            await call.read()
            code = await call.code() if call.done() else grpc.StatusCode.OK
        else:
            await call
            code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        info = rpc.error_info(err)
        return err.code(), info.reason if info else ""
    finally:
        call.cancel()
    return code, ""


def throwaway_ca_identity(who: Caller) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a certificate naming ``who``, issued by a CA made here, which no
    server of the platform trusts."""
    cert = foreign_certificate(who.spiffe_id, dns_names=(), chain_includes_ca=True)
    return cert.chain_pem, cert.key_pem


@dataclass
class Channels:
    """One channel per (server, caller), plus the two that cannot complete a handshake."""

    platform: Platform
    targets: dict[str, str]
    opened: dict[tuple[str, str], grpc.aio.Channel]

    def of(self, server: str, who: Caller) -> grpc.aio.Channel:
        key = (server, who.principal)
        if key not in self.opened:
            identity = self.platform.infra.identities(who)
            self.opened[key] = rpc.channel(self.targets[server], identity, deadline_s=TIMEOUT_S)
        return self.opened[key]

    def untrusted(self, server: str, kind: str) -> grpc.aio.Channel:
        """``no-certificate`` (TLS, the server verified, nothing presented) or ``other-ca``."""
        key = (server, kind)
        if key not in self.opened:
            ca = self.platform.infra.identities(CALLERS[1]).current().ca_pem
            if kind == "no-certificate":
                credentials = grpc.ssl_channel_credentials(ca)
            else:
                chain, key_pem = throwaway_ca_identity(CALLERS[1])  # an operator's name
                credentials = grpc.ssl_channel_credentials(ca, key_pem, chain)
            self.opened[key] = grpc.aio.secure_channel(self.targets[server], credentials)
        return self.opened[key]

    async def close(self) -> None:
        for ch in self.opened.values():
            await ch.close()


@pytest.fixture
async def channels(platform: Platform) -> AsyncIterator[Channels]:
    opened = Channels(platform, addresses(platform), {})
    yield opened
    await opened.close()


async def event_counts(platform: Platform) -> dict[str, int]:
    await platform.quiesce()  # what earlier tests caused has finished happening
    return {name: await r.runtime.store.count() for name, r in platform.running.items()}


async def test_every_rpc_by_every_caller_is_allowed_or_refused_exactly_as_the_table_says(
    platform: Platform, channels: Channels
) -> None:
    before = await event_counts(platform)
    wrong: list[str] = []
    called = 0
    for server, method in every_rpc():
        path = path_of(method)
        assert path in authz.RULES, f"{path} is served but has no entry in the table"
        for who in CALLERS:
            code, reason = await call_empty(channels.of(server, who), method)
            called += 1
            refused = (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
            if authz.allowed(path, who):
                # An empty request is bad input, never a server fault: INTERNAL is wrong too.
                if refused or code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL):
                    wrong.append(
                        f"{server} {path} as {who.principal}: allowed, got {code} {reason}"
                    )
            elif not refused:
                wrong.append(
                    f"{server} {path} as {who.principal}: not allowed, got {code} {reason}"
                )
        for kind in ("no-certificate", "other-ca"):
            code, reason = await call_empty(channels.untrusted(server, kind), method)
            called += 1
            if code != grpc.StatusCode.UNAVAILABLE:
                wrong.append(f"{server} {path} with {kind}: got {code} {reason}, not UNAVAILABLE")
    assert not wrong, "\n".join(wrong)
    assert called > 400  # every service's RPCs were in the matrix, not a handful
    # Empty requests are refused at the edge or find nothing: no service recorded anything.
    assert await event_counts(platform) == before


async def test_every_method_a_server_serves_is_in_the_matrix(
    platform: Platform, channels: Channels
) -> None:
    """Each server's reflection lists the services it serves: none may be missing from the
    descriptors the matrix walks, or from SERVED_BY for that server."""
    in_matrix: dict[str, set[str]] = {}
    for server, method in every_rpc():
        in_matrix.setdefault(server, set()).add(method.containing_service.full_name)
    for server in EVERY_SERVER:
        stub = reflection_pb2_grpc.ServerReflectionStub(channels.of(server, CALLERS[1]))
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S
        )
        response = await call.read()
        call.cancel()
        assert isinstance(response, reflection_pb2.ServerReflectionResponse)
        served = {s.name for s in response.list_services_response.service}
        assert served, server
        assert served <= in_matrix[server], f"{server} serves {served - in_matrix[server]}"


UNLISTED = "/test.v1.Unlisted/Drain"


async def serve_unlisted(
    platform: Platform, rules: dict[str, frozenset[str]], ran: list[str]
) -> tuple[grpc.aio.Server, str]:
    async def drain(request: empty_pb2.Empty, context: rpc.ServicerContext) -> empty_pb2.Empty:
        ran.append("drained")
        return empty_pb2.Empty()

    def register(servicer: object, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            drain,
            request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.v1.Unlisted", {"Drain": handler}),)
        )

    server, _ = rpc.build_server([(register, None)], [], rules=rules)
    identity = platform.infra.identities(Caller(Role.SERVICE, "test"))
    port = rpc.listen(server, "127.0.0.1:0", identity)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def call_drain(platform: Platform, target: str, who: Caller) -> Outcome:
    async with rpc.channel(target, platform.infra.identities(who)) as ch:
        call = ch.unary_unary(
            UNLISTED,
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        try:
            await call(empty_pb2.Empty())
        except grpc.aio.AioRpcError as err:
            info = rpc.error_info(err)
            return err.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


async def test_a_served_method_missing_from_the_table_is_refused_to_everyone(
    platform: Platform,
) -> None:
    assert UNLISTED not in authz.RULES
    ran: list[str] = []
    server, target = await serve_unlisted(platform, dict(authz.RULES), ran)
    try:
        for who in CALLERS:
            assert await call_drain(platform, target, who) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "ROLE_NOT_ALLOWED",
            ), who
    finally:
        await server.stop(grace=None)
    assert ran == []
    # The same server with a table entry lets the operator through: the refusal above was the
    # table's, not a broken test server.
    server, target = await serve_unlisted(
        platform, {**authz.RULES, UNLISTED: frozenset({authz.OPERATOR})}, ran
    )
    try:
        assert await call_drain(platform, target, CALLERS[1]) == (grpc.StatusCode.OK, "")
    finally:
        await server.stop(grace=None)
    assert ran == ["drained"]
