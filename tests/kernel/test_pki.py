"""The campaign's CA in a real OpenBao (services.kernel.pki) and mutual TLS with its certificates
(services.kernel.tls): what a certificate says, what a PKI role refuses, which clients a server
turns away, and renewal during traffic without a failed call."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import wrappers_pb2

from services.kernel import pki, tls
from services.kernel.identity import TRUST_DOMAIN, Caller, Role
from tests.conftest import Infra
from tests.support.foreign_ca import foreign_certificate

SERVICE = "test.v1.Who"
METHOD = f"/{SERVICE}/AmI"


def client(infra: Infra) -> hvac.Client:
    return hvac.Client(url=infra.bao.addr, token=infra.bao.token, timeout=10)


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def all_pems(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def verify_signed_by(child: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raises unless ``issuer``'s key signed ``child`` (EC or RSA)."""
    key = issuer.public_key()
    assert child.signature_hash_algorithm is not None
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(
            child.signature, child.tbs_certificate_bytes, ec.ECDSA(child.signature_hash_algorithm)
        )
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(
            child.signature,
            child.tbs_certificate_bytes,
            padding.PKCS1v15(),
            child.signature_hash_algorithm,
        )
    else:  # pragma: no cover
        raise AssertionError(f"unexpected CA key {type(key).__name__}")
    assert child.issuer == issuer.subject


# --------------------------------------------------------------------------------------------
# the CA and what it issues


def test_set_up_is_idempotent_and_gives_the_same_ca(infra: Infra) -> None:
    vault = client(infra)
    first = pki.ensure_pki(vault)
    again = pki.ensure_pki(vault)
    assert first == again == infra.bao.ca_pem  # OpenBao.start() already set it up
    intermediate, root = all_pems(first)
    assert root.subject == root.issuer  # self-signed
    verify_signed_by(root, root)
    verify_signed_by(intermediate, root)
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    mounts = vault.sys.list_mounted_secrets_engines()["data"]
    assert {f"{pki.ROOT_MOUNT}/", f"{pki.ISSUING_MOUNT}/"} <= set(mounts)
    roles = vault.secrets.pki.list_roles(mount_point=pki.ISSUING_MOUNT)["data"]["keys"]
    assert sorted(roles) == sorted(r.value for r in Role)


@pytest.mark.parametrize("role", list(Role))
def test_a_certificate_carries_exactly_the_spiffe_id_asked_for(infra: Infra, role: Role) -> None:
    who = Caller(role, "demo-1")
    cert = pki.issue(client(infra), who, ttl="5m")
    assert uri_sans(cert.leaf) == [f"spiffe://{TRUST_DOMAIN}/{role}/demo-1"] == [who.spiffe_id]
    assert cert.spiffe_id() == who.spiffe_id
    assert Caller.parse(cert.spiffe_id()) == who
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []  # nothing but what was asked for
    usage = cert.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    # Only a service's certificate may serve: a platform's cannot pose as a server.
    assert (ExtendedKeyUsageOID.SERVER_AUTH in usage) == (role is Role.SERVICE)
    key = serialization.load_pem_private_key(cert.key_pem, password=None)
    assert key.public_key() == cert.leaf.public_key()


def test_a_server_certificate_names_its_hosts(infra: Infra) -> None:
    cert = pki.issue(
        client(infra),
        Caller(Role.SERVICE, "ledger"),
        dns_names=["localhost", "ledger.subsidy.svc"],
        ip_sans=["127.0.0.1"],
    )
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["ledger.subsidy.svc", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert uri_sans(cert.leaf) == ["spiffe://subsidy.local/service/ledger"]


@pytest.mark.parametrize(
    ("role", "asked"),
    [
        ("platform", "spiffe://subsidy.local/operator/x"),
        ("platform", "spiffe://subsidy.local/approver/x"),
        ("operator", "spiffe://subsidy.local/approver/x"),  # no self-made checker
        ("approver", "spiffe://subsidy.local/service/ledger"),
        ("auditor", "spiffe://subsidy.local/operator/x"),
        ("platform", "spiffe://other.example/platform/x"),  # another trust domain
        ("platform", "spiffe://subsidy.local/platformx/x"),
    ],
)
def test_a_pki_role_cannot_mint_another_roles_id(infra: Infra, role: str, asked: str) -> None:
    with pytest.raises(hvac.exceptions.InvalidRequest):
        client(infra).secrets.pki.generate_certificate(
            role,
            "x",
            extra_params={"uri_sans": asked, "ttl": "5m"},
            mount_point=pki.ISSUING_MOUNT,
        )
    # and adding its own id beside the other one does not help
    own = f"spiffe://subsidy.local/{role}/x"
    with pytest.raises(hvac.exceptions.InvalidRequest):
        client(infra).secrets.pki.generate_certificate(
            role,
            "x",
            extra_params={"uri_sans": f"{own},{asked}", "ttl": "5m"},
            mount_point=pki.ISSUING_MOUNT,
        )


def test_the_ca_bundle_verifies_the_chain(infra: Infra) -> None:
    cert = pki.issue(client(infra), Caller(Role.AUDITOR, "zhao"))
    chain = all_pems(cert.chain_pem)
    assert chain[0] == cert.leaf and len(chain) == 2  # leaf + intermediate, never the root
    intermediate, root = all_pems(cert.ca_pem)
    assert cert.ca_pem == infra.bao.ca_pem
    verify_signed_by(cert.leaf, intermediate)
    verify_signed_by(chain[1], root)
    # The standard verifier agrees (what TLS does during the handshake).
    store = x509.verification.Store([root])
    verifier = x509.verification.PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(cert.leaf, [intermediate])
    assert verified.subjects is not None
    assert [
        str(u.value) for u in verified.subjects if isinstance(u, x509.UniformResourceIdentifier)
    ] == ["spiffe://subsidy.local/auditor/zhao"]


def test_a_short_ttl_is_honoured_and_a_long_one_capped(infra: Infra) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = pki.issue(client(infra), Caller(Role.PLATFORM, "jd"), ttl="30s")
    assert abs((cert.not_after - now).total_seconds() - 30) < 3
    # backdated a little (clock skew), never so much that renewal would come before issue
    assert cert.renew_at() > now
    long = pki.issue(client(infra), Caller(Role.PLATFORM, "jd"), ttl="8760h")
    assert long.not_after - now <= dt.timedelta(hours=720, seconds=5)  # the roles' max_ttl


def test_a_certificate_can_be_revoked_by_serial(infra: Infra) -> None:
    vault = client(infra)
    cert = pki.issue(vault, Caller(Role.PLATFORM, "revoked"))
    serial = pki.serial_of(cert)
    assert int(serial.replace(":", ""), 16) == cert.leaf.serial_number
    pki.revoke(vault, serial)
    stored = vault.read(f"{pki.ISSUING_MOUNT}/cert/{serial}")
    assert stored is not None and stored["data"]["revocation_time"] > 0


# --------------------------------------------------------------------------------------------
# mutual TLS on a real server


async def who_am_i(
    request: wrappers_pb2.StringValue,
    context: grpc.aio.ServicerContext[wrappers_pb2.StringValue, wrappers_pb2.StringValue],
) -> wrappers_pb2.StringValue:
    """The caller's SPIFFE id and the serial of the certificate it presented."""
    auth = context.auth_context()
    spiffe = b"".join(auth.get("peer_spiffe_id") or []).decode()
    pem = b"".join(auth.get("x509_pem_cert") or [])
    serial = x509.load_pem_x509_certificate(pem).serial_number if pem else 0
    return wrappers_pb2.StringValue(value=f"{spiffe} {serial:x}")


def register(server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        who_am_i,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"AmI": handler}),)
    )


@dataclass
class Served:
    port: int
    source: tls.VaultCertificates

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"


def issuer(
    infra: Infra, who: Caller, ttl: str, **names: list[str]
) -> Callable[[], tls.Certificate]:
    vault = client(infra)
    return lambda: pki.issue(vault, who, ttl=ttl, **names)


@pytest.fixture
async def served(infra: Infra, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    ttl = getattr(request, "param", "10m")
    source = tls.VaultCertificates(
        issuer(
            infra,
            Caller(Role.SERVICE, "ledger"),
            ttl,
            dns_names=["localhost"],
            ip_sans=["127.0.0.1"],
        )
    )
    server = grpc.aio.server()
    register(server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(source))
    await server.start()
    stop = asyncio.Event()
    renewing = asyncio.create_task(source.keep_fresh(stop))
    try:
        yield Served(port, source)
    finally:
        stop.set()
        await renewing
        await server.stop(grace=None)


def call(
    channel: grpc.aio.Channel | tls.RenewingChannel,
) -> grpc.aio.UnaryUnaryMultiCallable[wrappers_pb2.StringValue, wrappers_pb2.StringValue]:
    return channel.unary_unary(
        METHOD,
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )


async def test_a_mutual_tls_call_names_the_caller(infra: Infra, served: Served) -> None:
    me = tls.VaultCertificates(issuer(infra, Caller(Role.PLATFORM, "jd"), "10m"))
    async with tls.RenewingChannel(served.target, me) as channel:
        answer = await call(channel)(wrappers_pb2.StringValue(), timeout=5)
    spiffe, serial = answer.value.split()
    assert spiffe == "spiffe://subsidy.local/platform/jd"
    assert int(serial, 16) == me.current().leaf.serial_number
    # the IP SAN serves too
    async with tls.RenewingChannel(f"127.0.0.1:{served.port}", me) as channel:
        await call(channel)(wrappers_pb2.StringValue(), timeout=5)


async def test_a_plaintext_client_is_refused(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel)(wrappers_pb2.StringValue(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_without_a_client_certificate_is_refused(infra: Infra, served: Served) -> None:
    credentials = grpc.ssl_channel_credentials(infra.bao.ca_pem)
    async with grpc.aio.secure_channel(served.target, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel)(wrappers_pb2.StringValue(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(
    infra: Infra, served: Served
) -> None:
    impostor = foreign_certificate(
        "spiffe://subsidy.local/operator/mallory", trusted_ca=infra.bao.ca_pem
    )
    credentials = tls.channel_credentials(impostor)
    async with grpc.aio.secure_channel(served.target, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel)(wrappers_pb2.StringValue(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_from_another_ca_is_not_trusted(infra: Infra) -> None:
    """The client checks the server too: a look-alike server cannot collect the calls."""
    fake = foreign_certificate("spiffe://subsidy.local/service/ledger")
    own_ca_fake = tls.Certificate(fake.chain_pem, fake.key_pem, infra.bao.ca_pem)

    class Fixed:
        def current(self) -> tls.Certificate:
            return own_ca_fake

        async def keep_fresh(self, stop: asyncio.Event) -> None:  # pragma: no cover
            await stop.wait()

    server = grpc.aio.server()
    register(server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(Fixed()))
    await server.start()
    try:
        me = tls.VaultCertificates(issuer(infra, Caller(Role.PLATFORM, "jd"), "10m"))
        async with tls.RenewingChannel(f"localhost:{port}", me) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)(wrappers_pb2.StringValue(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)


async def test_a_client_certificate_cannot_serve(infra: Infra) -> None:
    """Only the service role's certificates carry serverAuth: a platform's certificate that
    names localhost still cannot pose as a service (gRPC checks the key usage)."""
    platform = pki.issue(
        client(infra), Caller(Role.PLATFORM, "evil"), dns_names=["localhost"], ip_sans=["127.0.0.1"]
    )

    class Fixed:
        def current(self) -> tls.Certificate:
            return platform

        async def keep_fresh(self, stop: asyncio.Event) -> None:  # pragma: no cover
            await stop.wait()

    server = grpc.aio.server()
    register(server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(Fixed()))
    await server.start()
    try:
        me = tls.VaultCertificates(issuer(infra, Caller(Role.PLATFORM, "jd"), "10m"))
        async with tls.RenewingChannel(f"localhost:{port}", me) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)(wrappers_pb2.StringValue(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)


def served_serial(port: int, me: tls.Certificate) -> int:
    """The serial of the certificate the server presents to a new handshake."""
    context = ssl.create_default_context(cadata=me.ca_pem.decode())
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        cert_file.write_bytes(me.chain_pem)
        key_file.write_bytes(me.key_pem)
        context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("served", ["10s"], indirect=True)
async def test_renewal_during_traffic_drops_no_call(infra: Infra, served: Served) -> None:
    """10 s certificates on both sides, renewed at two thirds of their lifetime; calls go on
    across at least two renewals of each and every one succeeds."""
    me = tls.VaultCertificates(issuer(infra, Caller(Role.PLATFORM, "jd"), "10s"))
    stop = asyncio.Event()
    renewing = asyncio.create_task(me.keep_fresh(stop))
    first_served = served_serial(served.port, me.current())
    client_serials: set[str] = set()
    calls = failures = 0
    try:
        async with tls.RenewingChannel(served.target, me, drain_s=5) as channel:
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and (
                served.source.renewals < 2 or me.renewals < 2 or len(client_serials) < 3
            ):
                try:
                    answer = await call(channel)(wrappers_pb2.StringValue(), timeout=5)
                    client_serials.add(answer.value.split()[1])
                except grpc.aio.AioRpcError as err:
                    failures += 1
                    print("failed:", err.code(), err.details())
                calls += 1
                await asyncio.sleep(0.05)
            last_served = served_serial(served.port, me.current())
    finally:
        stop.set()
        await renewing
    assert failures == 0, f"{failures} of {calls} calls failed"
    assert served.source.renewals >= 2 and me.renewals >= 2, (served.source.renewals, me.renewals)
    assert len(client_serials) >= 3  # the server saw the client's renewed certificates
    assert last_served != first_served
    assert last_served == served.source.current().leaf.serial_number
