"""Identities on disk from the real OpenBao's CA: what ``make run`` issues into run/certs, what
``subsidyctl certs issue`` writes, and when one is due for renewal."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.kernel import tls
from services.kernel.identity import Caller, Role
from subsidyctl.cli import main
from subsidyctl.localstack import LocalStack, Ports, write_private
from subsidyctl.stack import certs
from tests.conftest import Infra


def uri_sans(cert: tls.Certificate) -> list[str]:
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def assert_identity_dir(directory: Path, spiffe_id: str) -> tls.Certificate:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "tls.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    cert = tls.FileCertificates(directory).current()
    assert uri_sans(cert) == [spiffe_id]
    return cert


def stack_on(infra: Infra, run_dir: Path, ttl: str = "24h") -> LocalStack:
    """A LocalStack whose OpenBao is the test session's (nothing else started)."""
    stack = LocalStack(run_dir, Ports(infra.bao.port - 20), identity_ttl=ttl)
    stack.bao = infra.bao
    return stack


def test_the_stack_issues_the_demo_identities_and_the_simulators(
    infra: Infra, tmp_path: Path
) -> None:
    stack = stack_on(infra, tmp_path)
    written = stack.issue_identities()
    assert sorted(written) == sorted(
        [
            "platform-demo",
            "platform-other",
            "operator-demo",
            "approver-checker",
            "auditor-demo",
            "service-identity-sim",
        ]
    )
    now = dt.datetime.now(dt.UTC)
    for who in certs.DEMO_IDENTITIES:
        cert = assert_identity_dir(tmp_path / "certs" / certs.dir_name(who), who.spiffe_id)
        assert dt.timedelta(hours=23) < cert.not_after - now <= dt.timedelta(hours=24, seconds=5)
        assert cert.ca_pem == infra.bao.ca_pem
    sim = assert_identity_dir(
        tmp_path / "certs" / "service-identity-sim", "spiffe://subsidy.local/service/identity_sim"
    )
    san = sim.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # nothing is due yet: a renewal check writes nothing
    assert stack.issue_identities(only_due=True) == []
    # each start renews them all
    before = tls.FileCertificates(stack.identity(certs.OPERATOR_DEMO)).current()
    stack.issue_identities()
    after = tls.FileCertificates(stack.identity(certs.OPERATOR_DEMO)).current()
    assert after.leaf.serial_number != before.leaf.serial_number


def test_an_identity_is_due_two_thirds_into_its_lifetime_or_when_missing(
    infra: Infra, tmp_path: Path
) -> None:
    stack = stack_on(infra, tmp_path, ttl="60s")
    assert certs.due(tmp_path / "nowhere")
    stack.issue_identities()
    directory = stack.identity(certs.AUDITOR_DEMO)
    cert = tls.FileCertificates(directory).current()
    assert not certs.due(directory)
    assert certs.due(directory, now=cert.renew_at())
    (directory / "tls.crt").write_text("not a certificate")
    assert certs.due(directory)
    assert stack.issue_identities(only_due=True) == ["auditor-demo"]


def test_certs_issue_writes_an_identity_from_the_running_stack(
    infra: Infra, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_private(tmp_path / "LOCAL-ONLY-vault-token", infra.bao.token)
    common = ["--run-dir", str(tmp_path), "--base-port", str(infra.bao.port - 20), "--json"]
    out = tmp_path / "jd"
    args = [
        "certs",
        "issue",
        "--role",
        "platform",
        "--name",
        "jd",
        "--out",
        str(out),
        "--ttl",
        "2h",
    ]
    assert main([*args, *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    cert = assert_identity_dir(out, "spiffe://subsidy.local/platform/jd")
    assert shown["identity"] == "spiffe://subsidy.local/platform/jd"
    assert shown["dir"] == str(out)
    assert int(shown["serial"].replace(":", ""), 16) == cert.leaf.serial_number
    assert dt.datetime.fromisoformat(shown["not_after"]) == cert.not_after
    assert cert.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2, seconds=5)
    # a server certificate for a service, with its host names
    server = tmp_path / "ledger"
    served = [
        *("certs", "issue", "--role", "service", "--name", "ledger", "--out", str(server)),
        *("--host", "ledger.subsidy.svc", "--host", "10.0.0.7"),
    ]
    assert main([*served, *common]) == 0
    capsys.readouterr()
    cert = assert_identity_dir(server, Caller(Role.SERVICE, "ledger").spiffe_id)
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ledger.subsidy.svc"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_certs_issue_with_the_stack_down_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from subsidyctl.stack import free_port

    write_private(tmp_path / "LOCAL-ONLY-vault-token", "nobody-checks-this")
    base = free_port(2) - 20
    args = ["certs", "issue", "--role", "auditor", "--name", "z", "--out", str(tmp_path / "z")]
    assert main([*args, "--run-dir", str(tmp_path), "--base-port", str(base)]) == 3
    (err,) = capsys.readouterr().err.splitlines()
    assert "does not answer" in err
