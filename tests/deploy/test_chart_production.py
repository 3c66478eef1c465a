"""The production hardening of the rendered chart: no server reflection, no identity simulator
(nor its enrolment calls), metrics reachable only from inside the namespace or from the
monitoring namespace the values name, and PostgreSQL connections that verify the server.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.deploy.chart import (
    NAMESPACE,
    SERVICES,
    Manifest,
    Release,
    component_name,
    containers,
    parse,
    release,
    render,
    settings_of,
    workloads,
)
from tests.deploy.test_chart_settings import container_settings
from tests.deploy.test_values_schema import schema_error

# ---- reflection --------------------------------------------------------------------------


def test_reflection_is_what_the_values_say_and_off_unless_asked(rel: Release) -> None:
    wanted = "on" if rel.effective["grpc"]["reflection"] else "off"
    for service in SERVICES:
        assert settings_of(rel, service)["SUBSIDY_GRPC_REFLECTION"] == wanted, service
    if rel.profile not in {"dev"}:
        assert wanted == "off", "reflection is for dev clusters only"


def test_production_serves_no_reflection() -> None:
    rel = release("production")
    assert {settings_of(rel, s)["SUBSIDY_GRPC_REFLECTION"] for s in SERVICES} == {"off"}
    assert "describe" not in rel.notes, "the notes must not tell anyone to use reflection"


# ---- the identity simulator ----------------------------------------------------------------


def test_production_deploys_no_simulator_and_calls_the_real_authority() -> None:
    rel = release("production")
    assert rel.values["identitySimulator"]["enabled"] is False
    assert not [o for o in rel.objects if "identity-sim" in o["metadata"]["name"]]
    for obj, spec in workloads(rel):
        for container in containers(spec):
            assert "services.identity_sim" not in container.get("args", []), obj["metadata"]
    address = settings_of(rel, "eligibility")["SUBSIDY_IDENTITY_AUTHORITY_ADDR"]
    assert address == rel.effective["identityAuthority"]["address"]
    assert "SIMULATOR" not in rel.notes


# ---- metrics ---------------------------------------------------------------------------------


def admits_only_the_namespace_or_monitoring(peer: Manifest, monitoring: set[str]) -> bool:
    """Whether a NetworkPolicyPeer admits only pods of the release namespace or of one of the
    ``monitoring`` namespaces, named exactly (no ipBlock, no open namespaceSelector)."""
    if set(peer) - {"namespaceSelector", "podSelector"}:
        return False
    if "namespaceSelector" not in peer:
        return "podSelector" in peer  # a podSelector alone: the policy's own namespace
    selector = peer["namespaceSelector"]
    if selector.get("matchExpressions"):
        return False
    name = selector.get("matchLabels", {}).get("kubernetes.io/metadata.name")
    return name in monitoring | {NAMESPACE}


def test_the_metrics_port_is_reachable_only_from_the_namespace_or_monitoring(
    rel: Release,
) -> None:
    np = rel.effective["networkPolicy"]
    assert np["enabled"] or rel.profile not in {"production", "default"}
    monitoring = {
        np["prometheusSelector"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    }
    metrics = rel.effective["metrics"]["port"]
    opened = 0
    for policy in rel.of_kind("NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] == metrics for p in rule["ports"]):
                opened += 1
                name = policy["metadata"]["name"]
                assert rule["from"], name
                for peer in rule["from"]:
                    assert admits_only_the_namespace_or_monitoring(peer, monitoring), (name, peer)
                # The scrapers get the metrics port, not the gRPC one.
                assert {p["port"] for p in rule["ports"]} == {metrics}, name
    assert opened == len(SERVICES), "each service's scrape rule"
    for service in rel.of_kind("Service"):
        assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"ipBlock": {"cidr": "0.0.0.0/0"}}, "additional properties 'ipBlock' not allowed"),
        # null deletes the default's key, as `--set ...matchLabels=null` would
        ({"namespaceSelector": {"matchLabels": None}}, "missing property 'matchLabels'"),
        (
            {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
            "additional properties 'team' not allowed",
        ),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}},
            "additional properties 'matchExpressions' not allowed",
        ),
    ],
    ids=["ip-block", "any-namespace", "namespace-by-other-label", "namespace-expression"],
)
def test_the_schema_refuses_scrapers_from_outside(selector: dict[str, Any], expected: str) -> None:
    message = schema_error({"networkPolicy": {"prometheusSelector": selector}})
    assert "/networkPolicy/prometheusSelector" in message and expected in message, message


def test_another_monitoring_namespace_is_the_only_one_admitted() -> None:
    selector = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    objects = parse(render({"networkPolicy": {"prometheusSelector": selector}}))
    policy = next(
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == component_name("ledger")
    )
    scrape = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 9464]
    assert scrape == [{"from": [selector], "ports": [{"port": 9464, "protocol": "TCP"}]}]


# ---- PostgreSQL ------------------------------------------------------------------------------


def test_production_verifies_the_database_server() -> None:
    rel = release("production")
    for obj, spec in workloads(rel):
        for container in spec["containers"]:
            settings = container_settings(rel, container)
            for key, url in settings.items():
                if key.endswith("DATABASE_URL"):
                    assert url.endswith("?sslmode=verify-full"), (obj["metadata"]["name"], key)
                    root = settings["PGSSLROOTCERT"]
                    mounted = [
                        m
                        for m in container["volumeMounts"]
                        if root.startswith(m["mountPath"] + "/")
                    ]
                    assert mounted and all(m["readOnly"] for m in mounted), obj["metadata"]["name"]


@pytest.mark.parametrize("sslmode", ["verify-full", "verify-ca"])
def test_verifying_the_database_without_a_ca_bundle_fails_the_render(sslmode: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render({"postgresql": {"sslmode": sslmode}, "caBundle": {"configMapName": ""}})
    assert "set caBundle.configMapName" in str(caught.value)
