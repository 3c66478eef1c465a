"""The chart's Vault Agent certificate template, run by a real agent against a real OpenBao.

The Agent Injector turns a pod's ``agent-inject-template-<name>`` annotation into an agent
template whose destination is ``<secretsDir>/<name>``. Here ``bao agent`` runs the ledger's
annotation the same way (the injector's JSON config shape, ``error_on_missing_key`` on), logged
in with a token that holds only the Vault policy docs/operations.md gives the ledger, against
the PKI that services.kernel.pki sets up. The files it writes must be a certificate the ledger's
own probe can use over mutual TLS, and a second run must reuse it rather than issue another.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from cryptography import x509

from services.kernel import pki, rpc, tls
from services.kernel.identity import Caller, Role
from subsidyctl.stack.openbao import _bao_binary
from tests.conftest import Infra
from tests.deploy.chart import component_name, parse, render, vault_annotations
from tests.kernel.test_probe import probe

PREFIX = "vault.hashicorp.com"
LEDGER = component_name("ledger")
# The ledger's certificate policy exactly as docs/operations.md writes it for release subsidy.
NAMES = f"{LEDGER},{LEDGER}.subsidy,{LEDGER}.subsidy.svc,{LEDGER}.subsidy.svc.cluster.local"
LEDGER_POLICY = f"""
path "pki_int/issue/service" {{
  capabilities = ["update"]
  allowed_parameters = {{
    "common_name" = ["service-ledger"]
    "uri_sans"    = ["spiffe://subsidy.local/service/ledger"]
    "alt_names"   = ["{NAMES}"]
    "ip_sans"     = ["127.0.0.1"]
    "ttl"         = []
  }}
}}
path "pki_int/cert/ca_chain" {{ capabilities = ["read"] }}
"""


@pytest.fixture(scope="module")
def ledger_token(infra: Infra) -> Iterator[str]:
    admin = hvac.Client(url=infra.bao.addr, token=infra.bao.token)
    pki.ensure_pki(admin)
    admin.sys.create_or_update_policy("subsidy-ledger-tls-test", LEDGER_POLICY)
    token = admin.auth.token.create(policies=["subsidy-ledger-tls-test"], ttl="10m")
    yield token["auth"]["client_token"]


def run_agent(infra: Infra, token: str, secrets_dir: Path) -> None:
    """Render the ledger's TLS annotations with a real ``bao agent``, as its init container."""
    values = {"vault": {"injector": {"secretsDir": str(secrets_dir)}}}
    (deployment,) = [
        o
        for o in parse(render(values))
        if o["kind"] == "Deployment" and o["metadata"]["name"] == LEDGER
    ]
    annotations = vault_annotations(deployment, PREFIX)
    template = annotations["agent-inject-template-tls-bundle.pem"]
    token_file = secrets_dir.parent / "token"
    token_file.write_text(token)
    config = {
        "vault": {"address": infra.bao.addr},
        "auto_auth": {
            "method": [{"type": "token_file", "config": {"token_file_path": str(token_file)}}]
        },
        "exit_after_auth": True,
        "template_config": {"exit_on_retry_failure": True},
        "template": [
            {
                "destination": str(secrets_dir / "tls-bundle.pem"),
                "contents": template,
                "perms": annotations["agent-inject-perms-tls-bundle.pem"],
                "left_delimiter": "{{",
                "right_delimiter": "}}",
                "error_on_missing_key": True,
            }
        ],
    }
    config_file = secrets_dir.parent / "agent.json"
    config_file.write_text(json.dumps(config))
    done = subprocess.run(
        [str(_bao_binary()), "agent", f"-config={config_file}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_agent_renders_a_certificate_the_pods_probe_can_use(
    infra: Infra, ledger_token: str, tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    run_agent(infra, ledger_token, secrets_dir)

    cert = tls.FileCertificates(secrets_dir).current()
    assert Caller.parse(cert.spiffe_id()) == Caller(Role.SERVICE, "ledger")
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{LEDGER}.subsidy.svc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct((secrets_dir / tls.KEY_FILE).stat().st_mode & 0o777) == "0o400"
    # ca.crt reaches the root: the issuing CA alone would not verify a peer's chain.
    assert (secrets_dir / tls.CA_FILE).read_text().count("BEGIN CERTIFICATE") == 2

    async def serve_and_probe() -> int:
        server, health = rpc.build_server([], [], reflection_on=False)
        port = rpc.listen(server, "127.0.0.1:0", tls.FileCertificates(secrets_dir))
        await server.start()
        try:
            await rpc.set_serving(health, [])
            code, err = await probe(f"127.0.0.1:{port}", secrets_dir)
            assert err == ""
            return code
        finally:
            await server.stop(grace=None)

    assert asyncio.run(serve_and_probe()) == 0

    # pkiCert keeps its copy in tls-bundle.pem: a restarted agent reuses the certificate.
    serial = cert.leaf.serial_number
    run_agent(infra, ledger_token, secrets_dir)
    again = tls.FileCertificates(secrets_dir).current()
    assert again.leaf.serial_number == serial
    assert again.key_pem == cert.key_pem


def test_the_ledgers_policy_cannot_get_a_catalog_certificate(
    infra: Infra, ledger_token: str
) -> None:
    client = hvac.Client(url=infra.bao.addr, token=ledger_token)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.pki.generate_certificate(
            "service",
            "service-catalog",
            extra_params={"uri_sans": "spiffe://subsidy.local/service/catalog"},
            mount_point=pki.ISSUING_MOUNT,
        )
