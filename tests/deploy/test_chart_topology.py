"""The chart and the docs allow and draw exactly the flows services/kernel/topology.py declares.

A Helm chart cannot import Python, so it keeps its own copy of the topology (subsidy.topology in
_helpers.tpl). These tests render every values profile and compare what the chart really
does with the module, in both directions: a flow the module declares and the chart misses
fails, and so does a flow the chart allows that the module does not declare. The peers'
address settings, the NetworkPolicies' ingress and egress rules between components, the
outside roles' ingress, and the flow diagram in docs/architecture.md are each checked.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.kernel import topology
from services.kernel.settings import Settings
from tests.deploy.chart import (
    REPO_ROOT,
    SERVICES,
    Manifest,
    Release,
    allowances,
    component_name,
    may_connect,
    networked,
    resolve,
    settings_of,
    tcp,
)

SIMULATOR = "identity-sim"  # the simulator's app.kubernetes.io/name in the chart


def component_labels(name: str) -> dict[str, str]:
    """Labels of the serving pods of a release component (a service or the simulator)."""
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": "subsidy",
        "app.kubernetes.io/component": "simulator" if name == SIMULATOR else "server",
    }


def in_release(rel: Release, peer: str) -> str | None:
    """The release component that answers calls to ``peer``; None when it is outside the
    release (the real identity authority)."""
    if peer != topology.IDENTITY_AUTHORITY:
        return peer
    return SIMULATOR if rel.effective["identitySimulator"]["enabled"] else None


def declared_flows(rel: Release) -> set[tuple[str, str]]:
    """The module's gRPC flows between components of this release."""
    flows = set()
    for caller, peer in topology.calls():
        callee = in_release(rel, peer)
        if callee is not None:
            flows.add((caller, callee))
    return flows


def components(rel: Release) -> list[str]:
    present = [*SERVICES]
    if rel.effective["identitySimulator"]["enabled"]:
        present.append(SIMULATOR)
    return present


def policy_of(rel: Release, name: str) -> Manifest:
    return rel.named("NetworkPolicy", component_name(name))


def grpc_peers(rel: Release, name: str, direction: str) -> set[str]:
    """Release components a component's policy admits on the gRPC port, in one direction."""
    grpc = tcp(rel.effective["grpc"]["port"])
    return {
        who
        for who, ports in allowances(rel, policy_of(rel, name), direction)
        if ports == grpc and who in components(rel)
    }


def test_the_topology_module_is_consistent() -> None:
    """Every peer and producer is a declared service (or the authority role); no service calls
    itself; ports do not collide."""
    names = set(topology.SERVICE_NAMES)
    for s in topology.SERVICES:
        assert set(s.calls) <= names | {topology.IDENTITY_AUTHORITY}, s.name
        assert s.name not in s.calls, s.name
        assert set(s.consumes) <= names, s.name
        assert set(s.clients) <= {topology.PLATFORM, topology.AUDITOR}, s.name
    offsets = [s.port_offset for s in topology.SERVICES] + [topology.SIMULATOR_PORT_OFFSET]
    assert len(set(offsets)) == len(offsets)
    # Start order: a service starts after every service it calls.
    order = list(topology.SERVICE_NAMES)
    for caller, peer in topology.calls():
        if peer in names:
            assert order.index(peer) < order.index(caller), (caller, peer)


def test_each_service_is_given_the_address_of_exactly_its_peers(rel: Release) -> None:
    for service in SERVICES:
        settings = settings_of(rel, service)
        # Every *_ADDR setting but the ones all services read (SUBSIDY_VAULT_ADDR).
        common = {v.name for v in Settings.variables()}
        given = {k for k in settings if re.fullmatch(r"SUBSIDY_\w+_ADDR", k)} - common
        assert given == {topology.addr_variable(p) for p in topology.peers(service)}, service
        for peer in topology.peers(service):
            address = settings[topology.addr_variable(peer)]
            callee = in_release(rel, peer)
            if callee is None:
                assert address == rel.effective["identityAuthority"]["address"]
            else:
                assert resolve(rel, address)["metadata"]["name"] == component_name(callee)


def test_egress_rules_between_components_are_exactly_the_declared_calls(rel: Release) -> None:
    networked(rel)
    allowed = {(src, dst) for src in components(rel) for dst in grpc_peers(rel, src, "egress")}
    assert allowed == declared_flows(rel)


def test_ingress_rules_between_components_are_exactly_the_declared_calls(rel: Release) -> None:
    networked(rel)
    allowed = {(src, dst) for dst in components(rel) for src in grpc_peers(rel, dst, "ingress")}
    assert allowed == declared_flows(rel)


def test_kubernetes_lets_through_exactly_the_declared_calls(rel: Release) -> None:
    """Kubernetes' verdict for every ordered pair of components (egress and ingress together)."""
    networked(rel)
    grpc = rel.effective["grpc"]["port"]
    allowed = {
        (src, dst)
        for src in components(rel)
        for dst in components(rel)
        if src != dst and may_connect(rel, component_labels(src), component_labels(dst), grpc)
    }
    assert allowed == declared_flows(rel)


def test_outside_roles_reach_exactly_the_services_declared_for_them(rel: Release) -> None:
    networked(rel)
    grpc = tcp(rel.effective["grpc"]["port"])
    roles = {topology.PLATFORM, topology.AUDITOR}
    allowed = {
        (who, service)
        for service in SERVICES
        for who, ports in allowances(rel, policy_of(rel, service), "ingress")
        if ports == grpc and who in roles
    }
    assert allowed == set(topology.client_calls())


def test_only_the_callers_of_the_authority_may_leave_for_its_cidrs(rel: Release) -> None:
    networked(rel)
    values = rel.effective
    callers = {caller for caller, peer in topology.calls() if peer == topology.IDENTITY_AUTHORITY}
    for service in SERVICES:
        cidrs = {
            (who, ports)
            for who, ports in allowances(rel, policy_of(rel, service), "egress")
            if who.startswith("cidr ")
        }
        expected = set()
        if service in callers and not values["identitySimulator"]["enabled"]:
            authority = values["identityAuthority"]
            expected = {(f"cidr {c}", tcp(authority["port"])) for c in authority["egressCIDRs"]}
        assert cidrs == expected, service


# ---- the docs' flow diagram -----------------------------------------------------------------

ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
# Diagram node -> topology name. The operator reaches services through kubectl port-forward,
# not through the network the topology governs, so its arrows are not flows.
NODES = {
    **{s: s for s in topology.SERVICE_NAMES},
    "platform": topology.PLATFORM,
    "auditor": topology.AUDITOR,
    "authority": topology.IDENTITY_AUTHORITY,
}
EDGE = re.compile(r"^\s*(\w+)(?:\([^)]*\)|\[[^\]]*\]|\{\{[^}]*\}\})?\s*--\s*(.*?)\s*-->\s*(\w+)")


def diagram_edges(path: Path) -> list[tuple[str, str, str]]:
    """(from node, label, to node) of every solid arrow in the first flowchart of ``path``."""
    text = path.read_text()
    block = text.split("```mermaid\nflowchart", 1)[1].split("```", 1)[0]
    edges = []
    for line in block.splitlines():
        m = EDGE.match(line)
        if m:
            edges.append((m.group(1), m.group(2).strip('"'), m.group(3)))
    return edges


def test_the_architecture_diagram_draws_exactly_the_declared_flows() -> None:
    edges = diagram_edges(ARCHITECTURE)
    grpc = {
        (NODES[src], NODES[dst])
        for src, label, dst in edges
        if "gRPC" in label and src in NODES and dst in NODES
    }
    assert grpc == set(topology.calls()) | set(topology.client_calls())
    # Events: the diagram draws JetStream -> consumer, one arrow per kind of fact.
    consumers = {NODES[dst] for src, _, dst in edges if src == "js" and dst in NODES}
    assert consumers == {consumer for _, consumer in topology.event_flows()}
