"""The exec probe (python -m services.kernel.probe) against a real mutual-TLS gRPC server.

The server is the one every service builds (rpc.build_server + rpc.listen, health included);
its certificate and the probe's come from the test OpenBao's PKI engine, as in the cluster.
The probe runs as the kubelet runs it, as a process, and is judged by its exit code.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc_health.v1.health as grpc_health
import hvac
import pytest

from services.kernel import pki, rpc, tls
from services.kernel.identity import Caller, Role
from subsidyctl.stack import free_port
from tests.conftest import Infra
from tests.support.foreign_ca import foreign_certificate

LEDGER = Caller(Role.SERVICE, "ledger")
SERVICE_NAME = "subsidy.v1.LedgerService"
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_identity(directory: Path, cert: tls.Certificate) -> Path:
    """tls.crt, tls.key and ca.crt in ``directory``, as Vault Agent or cert-manager leave them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / tls.CERT_FILE).write_bytes(cert.chain_pem)
    (directory / tls.KEY_FILE).write_bytes(cert.key_pem)
    (directory / tls.CA_FILE).write_bytes(cert.ca_pem)
    return directory


@pytest.fixture(scope="module")
def vault(infra: Infra) -> hvac.Client:
    client = hvac.Client(url=infra.bao.addr, token=infra.bao.token)
    pki.ensure_pki(client)
    return client


@pytest.fixture(scope="module")
def pod_identity(vault: hvac.Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pod's own certificate: its service's SPIFFE id, its Service name and 127.0.0.1,
    which the probe dials (the chart's certificates carry the same names)."""
    cert = pki.issue(
        vault, LEDGER, ttl="10m", dns_names=["subsidy-ledger.subsidy.svc"], ip_sans=["127.0.0.1"]
    )
    return write_identity(tmp_path_factory.mktemp("pod-tls"), cert)


@pytest.fixture
async def server(pod_identity: Path) -> AsyncIterator[tuple[str, grpc_health.aio.HealthServicer]]:
    """A service's server with no servicer of its own: health only, mutual TLS only."""
    srv, health = rpc.build_server([], [SERVICE_NAME], reflection_on=False)
    port = rpc.listen(srv, "127.0.0.1:0", tls.FileCertificates(pod_identity))
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", health
    finally:
        await srv.stop(grace=None)


async def probe(addr: str, tls_dir: Path, *extra: str) -> tuple[int, str]:
    """Run the probe as the kubelet does; its exit code and stderr."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.kernel.probe",
        "--addr",
        addr,
        "--tls-dir",
        str(tls_dir),
        *extra,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode is not None
    return child.returncode, err.decode()


async def test_exits_zero_when_the_server_is_serving(
    server: tuple[str, grpc_health.aio.HealthServicer], pod_identity: Path
) -> None:
    # Not how long it took (a test's clock is the machine's load; CI's went past 3 s): its
    # --timeout bounds a run, as test_exits_non_zero_when_no_server_answers shows.
    addr, health = server
    await rpc.set_serving(health, [SERVICE_NAME])
    assert await probe(addr, pod_identity) == (0, "")
    assert await probe(addr, pod_identity, "--service", SERVICE_NAME) == (0, "")


async def test_exits_non_zero_when_not_serving(
    server: tuple[str, grpc_health.aio.HealthServicer], pod_identity: Path
) -> None:
    addr, health = server
    await rpc.set_serving(health, [SERVICE_NAME])
    await rpc.set_not_serving(health, [SERVICE_NAME])
    code, err = await probe(addr, pod_identity)
    assert code == 1 and "NOT_SERVING" in err, err
    code, err = await probe(addr, pod_identity, "--service", SERVICE_NAME)
    assert code == 1 and "NOT_SERVING" in err, err


async def test_exits_non_zero_when_no_server_answers(pod_identity: Path) -> None:
    code, err = await probe(f"127.0.0.1:{free_port()}", pod_identity, "--timeout", "1")
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err), err


async def test_exits_non_zero_without_a_certificate(
    server: tuple[str, grpc_health.aio.HealthServicer], tmp_path: Path
) -> None:
    addr, health = server
    await rpc.set_serving(health, [SERVICE_NAME])
    code, err = await probe(addr, tmp_path)  # the agent has not written anything yet
    assert code == 1 and "no usable certificate" in err, err


def foreign_identity(directory: Path) -> Path:
    """A certificate with the ledger's SPIFFE id and the right names, from another CA."""
    return write_identity(
        directory, foreign_certificate(LEDGER.spiffe_id, dns_names=["subsidy-ledger.subsidy.svc"])
    )


async def test_exits_non_zero_with_a_certificate_from_another_ca(
    server: tuple[str, grpc_health.aio.HealthServicer], tmp_path: Path
) -> None:
    addr, health = server
    await rpc.set_serving(health, [SERVICE_NAME])
    code, err = await probe(addr, foreign_identity(tmp_path / "foreign"), "--timeout", "2")
    # Neither side trusts the other: the handshake fails, no health answer is read.
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err), err
