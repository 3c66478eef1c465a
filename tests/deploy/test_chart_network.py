"""NetworkPolicies of the rendered chart: a default deny, then exactly the calls the design
needs (tests/deploy/test_chart_topology.py checks the same flows against the topology module).
Every test runs once per values profile.
"""

from __future__ import annotations

from tests.deploy.chart import (
    SERVICES,
    Release,
    allowances,
    component_name,
    may_connect,
    networked,
    pod_labels,
    selects,
    server_labels,
    tcp,
    workloads,
)


def test_a_default_deny_covers_every_pod_of_the_release(rel: Release) -> None:
    networked(rel)
    deny = [
        p
        for p in rel.of_kind("NetworkPolicy")
        if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1
    for obj, _ in workloads(rel):
        assert selects(deny[0]["spec"]["podSelector"], pod_labels(obj)), obj["metadata"]["name"]


def test_every_pod_has_an_allow_policy_besides_the_default_deny(rel: Release) -> None:
    networked(rel)
    for obj, _ in workloads(rel):
        allowing = [
            p
            for p in rel.of_kind("NetworkPolicy")
            if selects(p["spec"]["podSelector"], pod_labels(obj))
            and (p["spec"].get("ingress") or p["spec"].get("egress"))
        ]
        assert allowing, f"{obj['kind']} {obj['metadata']['name']} can reach nothing, not even DNS"


def test_no_rule_opens_a_pod_to_everyone(rel: Release) -> None:
    # An empty from/to, an empty peer or a missing port list each mean "anything".
    for policy in rel.of_kind("NetworkPolicy"):
        for direction, peers in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                where = f"{policy['metadata']['name']} {direction}"
                assert rule.get(peers), where
                assert all(peer for peer in rule[peers]), where
                assert rule.get("ports"), where


def test_only_the_designed_calls_between_services_are_allowed(rel: Release) -> None:
    networked(rel)
    grpc = rel.effective["grpc"]["port"]
    designed = {("ledger", "catalog"), ("ledger", "eligibility")}
    for src in SERVICES:
        for dst in SERVICES:
            if src != dst:
                allowed = may_connect(rel, server_labels(src), server_labels(dst), grpc)
                assert allowed == ((src, dst) in designed), f"{src} -> {dst}"


def test_the_identity_simulator_is_absent_or_reachable_only_from_eligibility(
    rel: Release,
) -> None:
    networked(rel)
    if not rel.effective["identitySimulator"]["enabled"]:
        # Production talks to the real provincial platform: no simulator may be deployed.
        assert not [o for o in rel.objects if "identity-sim" in o["metadata"]["name"]]
        return
    sim = {
        "app.kubernetes.io/name": "identity-sim",
        "app.kubernetes.io/instance": "subsidy",
        "app.kubernetes.io/component": "simulator",
    }
    grpc = rel.effective["grpc"]["port"]
    for src in SERVICES:
        assert may_connect(rel, server_labels(src), sim, grpc) == (src == "eligibility"), src


def test_each_service_accepts_exactly_the_designed_callers(rel: Release) -> None:
    networked(rel)
    grpc, metrics = tcp(rel.effective["grpc"]["port"]), tcp(rel.effective["metrics"]["port"])
    expected = {  # auditors reach every store to cross-check the log (audit verify)
        "catalog": {("ledger", grpc), ("auditor", grpc)},
        "eligibility": {("platform", grpc), ("ledger", grpc), ("auditor", grpc)},
        "ledger": {("platform", grpc), ("auditor", grpc)},
        # platforms file and follow complaints (the audit service's supervision cases)
        "audit": {("platform", grpc), ("auditor", grpc)},
    }
    for service in SERVICES:
        policy = rel.named("NetworkPolicy", component_name(service))
        assert allowances(rel, policy, "ingress") == {
            ("prometheus", metrics),
            *expected[service],
        }, service


def test_each_service_reaches_exactly_its_dependencies(rel: Release) -> None:
    networked(rel)
    values = rel.effective
    grpc = tcp(values["grpc"]["port"])
    everyone = {
        ("dns", frozenset({(53, "UDP"), (53, "TCP")})),
        ("otlp", tcp(values["otel"]["port"])),
        ("nats", tcp(values["nats"]["port"])),
        ("postgresql", tcp(values["postgresql"]["port"])),
        ("vault", tcp(values["vault"]["port"])),
    }
    authority = values["identityAuthority"]
    if values["identitySimulator"]["enabled"]:
        identity = {("identity-sim", grpc)}
    else:
        identity = {(f"cidr {c}", tcp(authority["port"])) for c in authority["egressCIDRs"]}
    expected = {
        "catalog": set(),
        "eligibility": identity,
        "ledger": {("catalog", grpc), ("eligibility", grpc)},
        "audit": set(),
    }
    for service in SERVICES:
        policy = rel.named("NetworkPolicy", component_name(service))
        assert allowances(rel, policy, "egress") == everyone | expected[service], service
