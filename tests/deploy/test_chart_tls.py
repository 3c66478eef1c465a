"""Mutual TLS in the rendered chart: every serving pod gets a certificate for its own SPIFFE id
and Service names from Vault's PKI engine (through the Vault Agent or cert-manager, as the
values say), reads it from SUBSIDY_TLS_DIR, and is probed over mutual TLS by an exec probe.
There is no plaintext port and no way to ask for one. Every test runs once per values profile.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from services.kernel import tls
from services.kernel.identity import Caller, Role
from tests.deploy.chart import (
    CHART_DIR,
    NAMESPACE,
    PROFILES,
    SERVICES,
    Manifest,
    Release,
    component_name,
    containers,
    deployment_of,
    parse,
    release,
    render,
    settings_of,
    vault_annotations,
    workloads,
)
from tests.deploy.test_chart_settings import container_settings
from tests.deploy.test_values_schema import schema_error

SIMULATOR = "identity-sim"
CERT_FILES = {tls.CERT_FILE, tls.KEY_FILE, tls.CA_FILE}


def serving(rel: Release) -> list[str]:
    """The release components that serve gRPC: the services, and the simulator when on."""
    present = list(SERVICES)
    if rel.effective["identitySimulator"]["enabled"]:
        present.append(SIMULATOR)
    return present


def app_container(rel: Release, name: str) -> Manifest:
    container: Manifest
    (container,) = deployment_of(rel, name)["spec"]["template"]["spec"]["containers"]
    return container


def tls_dir(rel: Release, name: str) -> str:
    return container_settings(rel, app_container(rel, name))["SUBSIDY_TLS_DIR"]


def dns_names(name: str, cluster_domain: str = "cluster.local") -> set[str]:
    service = component_name(name)
    return {
        service,
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.{cluster_domain}",
    }


def hosts_clients_dial(rel: Release, name: str) -> set[str]:
    """The host names the release's own callers use for ``name`` (its peers' *_ADDR settings):
    the certificate must carry each, or the caller's TLS check of the server fails."""
    hosts = set()
    for service in SERVICES:
        for key, value in settings_of(rel, service).items():
            if key.endswith("_ADDR") and key != "SUBSIDY_VAULT_ADDR":
                host = value.rsplit(":", 1)[0]
                if host.split(".", 1)[0] == component_name(name):
                    hosts.add(host)
    return hosts


# ---- every profile ---------------------------------------------------------------------


def test_every_serving_pod_reads_its_certificate_from_files(rel: Release) -> None:
    for name in serving(rel):
        settings = container_settings(rel, app_container(rel, name))
        assert settings["SUBSIDY_TLS_SOURCE"] == "files", name
        assert settings["SUBSIDY_TLS_DIR"].startswith("/"), name


def test_the_provider_is_one_of_the_two_and_never_a_plaintext_mode(rel: Release) -> None:
    assert rel.effective["tls"]["provider"] in {"vaultAgent", "certManager"}


def test_no_container_has_a_native_grpc_probe_and_each_server_an_exec_probe(
    rel: Release,
) -> None:
    # A native gRPC probe cannot present a certificate: it would need a plaintext port.
    for obj, spec in workloads(rel):
        for container in containers(spec):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "grpc" not in container.get(kind, {}), (obj["metadata"]["name"], kind)
    port = rel.effective["grpc"]["port"]
    for name in serving(rel):
        container = app_container(rel, name)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert probe["exec"]["command"] == [
                "python",
                "-m",
                "services.kernel.probe",
                "--addr",
                f"127.0.0.1:{port}",
                "--tls-dir",
                tls_dir(rel, name),
                "--timeout",
                "3",
            ], (name, kind)
            # The probe gives up (--timeout 3) before the kubelet does.
            assert probe["timeoutSeconds"] > 3, (name, kind)


def test_servers_expose_only_the_mutual_tls_port_and_the_metrics_port(rel: Release) -> None:
    values = rel.effective
    for name in serving(rel):
        ports = {p["name"]: p["containerPort"] for p in app_container(rel, name)["ports"]}
        allowed = {"grpc": values["grpc"]["port"], "metrics": values["metrics"]["port"]}
        assert ports.items() <= allowed.items(), name


def test_migration_jobs_get_no_certificate(rel: Release) -> None:
    # They only migrate the schema and call nobody: a certificate there would be one more key.
    prefix = rel.effective["vault"]["injector"]["annotationPrefix"]
    for service in SERVICES:
        job = rel.named("Job", component_name(f"{service}-migrate"))
        annotations = vault_annotations(job, prefix)
        assert not [k for k in annotations if "tls" in k], service
        spec = job["spec"]["template"]["spec"]
        assert not [v for v in spec["volumes"] if "secret" in v], service


# ---- Vault Agent -------------------------------------------------------------------------


def profiles_where(provider: str, *, simulator: bool = False) -> list[str]:
    """The profiles whose certificates come from ``provider`` (and that deploy the simulator,
    when asked): each provider's tests run where it is used, so nothing is skipped."""
    return sorted(
        p
        for p in PROFILES
        if release(p).effective["tls"]["provider"] == provider
        and (not simulator or release(p).effective["identitySimulator"]["enabled"])
    )


def pki_cert_call(template: str) -> tuple[str, dict[str, str]]:
    """The path and parameters of the pkiCert call in a Vault Agent template."""
    match = re.search(r'pkiCert "([^"]+)"((?: "[^"]*")+)', template)
    assert match, template
    params = dict(p.split("=", 1) for p in re.findall(r'"([^"]*)"', match.group(2)))
    return match.group(1), params


@pytest.mark.parametrize("profile", profiles_where("vaultAgent"))
def test_vault_agent_issues_each_servers_certificate_for_its_own_identity(profile: str) -> None:
    rel = release(profile)
    values = rel.effective
    prefix = values["vault"]["injector"]["annotationPrefix"]
    secrets_dir = values["vault"]["injector"]["secretsDir"]
    for name in serving(rel):
        deployment = deployment_of(rel, name)
        annotations = vault_annotations(deployment, prefix)
        assert annotations["agent-inject"] == "true", name
        # The agent keeps running beside the app and renews the certificate before it expires.
        assert annotations["agent-pre-populate-only"] == "false", name
        assert annotations["agent-inject-perms-tls-bundle.pem"] == "0400", name
        template = annotations["agent-inject-template-tls-bundle.pem"]
        path, params = pki_cert_call(template)
        assert path == "pki_int/issue/service" == values["tls"]["vaultAgent"]["issuePath"]
        assert annotations["agent-inject-secret-tls-bundle.pem"] == path
        assert Caller.parse(params["uri_sans"]) == Caller(Role.SERVICE, name), name
        assert set(params["alt_names"].split(",")) == dns_names(name), name
        assert hosts_clients_dial(rel, name) <= set(params["alt_names"].split(",")), name
        assert params["ip_sans"] == "127.0.0.1", "the exec probe dials 127.0.0.1"
        assert params["ttl"] == values["tls"]["duration"]
        # The three files the service reads, where SUBSIDY_TLS_DIR says, the key for the app only.
        written = dict(re.findall(r'writeToFile "([^"]+)" "" "" "(\d{4})"', template))
        assert {p.rsplit("/", 1)[1] for p in written} == CERT_FILES, name
        assert {p.rsplit("/", 1)[0] for p in written} == {tls_dir(rel, name)} == {secrets_dir}
        assert written[f"{secrets_dir}/{tls.KEY_FILE}"] == "0400"
        assert f'secret "{values["tls"]["vaultAgent"]["caChainPath"]}"' in template
        # The injector writes the template to <secretsDir>/tls-bundle.pem, which pkiCert reads
        # back as its cache: it must hold the certificate, the CA and the key.
        assert "{{ .Cert }}{{ .CA }}{{ .Key }}" in template
    assert rel.of_kind("Certificate") == []


@pytest.mark.parametrize("profile", profiles_where("vaultAgent", simulator=True))
def test_the_simulator_logs_in_to_vault_only_for_its_certificate(profile: str) -> None:
    rel = release(profile)
    prefix = rel.effective["vault"]["injector"]["annotationPrefix"]
    annotations = vault_annotations(deployment_of(rel, SIMULATOR), prefix)
    assert annotations["role"] == "subsidy-identity-sim"
    assert {k for k in annotations if k.startswith("agent-inject-secret-")} == {
        "agent-inject-secret-tls-bundle.pem"
    }


# ---- cert-manager --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", profiles_where("certManager"))
def test_cert_manager_issues_each_servers_certificate_for_its_own_identity(profile: str) -> None:
    rel = release(profile)
    values = rel.effective
    certificates = {c["metadata"]["name"]: c for c in rel.of_kind("Certificate")}
    assert set(certificates) == {component_name(n) for n in serving(rel)}
    prefix = values["vault"]["injector"]["annotationPrefix"]
    for name in serving(rel):
        cert = certificates[component_name(name)]
        # kubernetes-validate has no schema for this CRD: check cert-manager's shape by hand.
        assert cert["apiVersion"] == "cert-manager.io/v1"
        spec = cert["spec"]
        assert set(spec) <= {
            "secretName",
            "secretTemplate",
            "commonName",
            "uris",
            "dnsNames",
            "ipAddresses",
            "duration",
            "renewBefore",
            "privateKey",
            "usages",
            "issuerRef",
        }, sorted(spec)
        assert [Caller.parse(u) for u in spec["uris"]] == [Caller(Role.SERVICE, name)]
        assert set(spec["dnsNames"]) == dns_names(name)
        assert hosts_clients_dial(rel, name) <= set(spec["dnsNames"]), name
        assert spec["ipAddresses"] == ["127.0.0.1"]
        assert spec["issuerRef"] == values["tls"]["certManager"]["issuerRef"]
        assert (spec["duration"], spec["renewBefore"]) == (
            values["tls"]["duration"],
            values["tls"]["renewBefore"],
        )
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        assert re.fullmatch(r"[0-9]+[hm]", spec["duration"])
        # The Secret it fills is mounted read-only where SUBSIDY_TLS_DIR says, all three files.
        deployment = deployment_of(rel, name)
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [
            m
            for m in app_container(rel, name)["volumeMounts"]
            if m["mountPath"] == tls_dir(rel, name)
        ]
        (mount,) = mounts
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == spec["secretName"]
        assert {i["path"] for i in secret["items"]} == CERT_FILES
        assert secret["defaultMode"] & 0o007 == 0, "not readable by other users"
        # No second source of certificates.
        assert not [k for k in vault_annotations(deployment, prefix) if "tls" in k], name


# ---- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["none", "", "insecure", "plaintext", "disabled"])
def test_the_schema_refuses_any_provider_but_the_two(provider: str) -> None:
    assert "at '/tls/provider'" in schema_error({"tls": {"provider": provider}})


def test_the_schema_has_no_switch_to_turn_tls_off() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    tls_keys = set(schema["properties"]["tls"]["properties"])
    assert tls_keys == {
        "provider",
        "duration",
        "renewBefore",
        "clusterDomain",
        "vaultAgent",
        "certManager",
    }
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.extend(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert not [n for n in names if re.search(r"insecure|plaintext|skipVerify|mtls", n, re.I)]
    assert schema_error({"tls": {"enabled": False}})


def test_a_cert_manager_install_without_the_simulator_certifies_the_four_services() -> None:
    objects = parse(render({"tls": {"provider": "certManager"}}))
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "Certificate"}
    assert names == {component_name(s) for s in SERVICES}
