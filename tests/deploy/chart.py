"""Render the Helm chart offline and look at the result as Kubernetes objects.

Rendering uses Helm's own Go SDK (helm-python-sdk), so values coalescing, schema validation and
template functions behave exactly as `helm install` would; nothing here talks to a cluster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "subsidy"
RELEASE = "subsidy"
NAMESPACE = "subsidy"
# The oldest Kubernetes the chart is validated against (Chart.yaml allows >=1.27; native gRPC
# probes, autoscaling/v2, policy/v1 and CronJob timeZone are all GA there).
KUBE_VERSION = "1.30.0"
SERVICES = ("catalog", "eligibility", "ledger", "audit")
APP_UID = 10001

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Release:
    """One rendered release: its objects and its NOTES.txt."""

    profile: str
    values: dict[str, Any]  # what the profile sets
    effective: dict[str, Any]  # the chart's defaults coalesced with those, as Helm uses them
    objects: list[Manifest]
    notes: str

    def of_kind(self, kind: str) -> list[Manifest]:
        """Every object of one kind."""
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest:
        """The one object of this kind and name; fails the test if absent."""
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected exactly one {kind} {name}, found {len(found)}"
        return found[0]


def values_file(name: str) -> dict[str, Any]:
    """Parse a values file in the chart directory the way `helm -f` does."""
    parsed: dict[str, Any] = helm.values_from_yaml((CHART_DIR / name).read_text())
    return parsed


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the chart with ``values`` over its defaults; raises helm's error if it fails."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def effective_values(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chart's defaults coalesced with ``values``, as an install would use them."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(values)


def parse(rendered: dict[str, str]) -> list[Manifest]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents left out)."""
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects.extend(document for document in yaml.safe_load_all(text) if document)
    return objects


def _everything_on() -> dict[str, Any]:
    return {
        "backup": {"enabled": True},
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
            "prometheusRule": {"enabled": True},
        },
        "identitySimulator": {"enabled": True},
        "caBundle": {"configMapName": "subsidy-ca"},
    }


def _cert_manager() -> dict[str, Any]:
    return {
        **values_file("values-production.yaml"),
        "tls": {"provider": "certManager"},
        "identitySimulator": {"enabled": True},
    }


# The value sets every test runs against: the defaults, each example values file, the defaults
# with every optional part switched on so those templates are checked too, and production with
# cert-manager (and the simulator, so its Certificate is checked) instead of the Vault Agent.
PROFILES: dict[str, Callable[[], dict[str, Any]]] = {
    "default": dict,
    "production": lambda: values_file("values-production.yaml"),
    "dev": lambda: values_file("values-dev.yaml"),
    "everything-on": _everything_on,
    "cert-manager": _cert_manager,
}


@functools.cache
def release(profile: str) -> Release:
    """Render one profile and parse it into objects; cached, so each renders once a session."""
    values = PROFILES[profile]()
    rendered = render(values or None)
    notes = next((text for path, text in rendered.items() if path.endswith("NOTES.txt")), "")
    return Release(
        profile=profile,
        values=values,
        effective=effective_values(values or None),
        objects=parse(rendered),
        notes=notes,
    )


def component_name(service: str) -> str:
    """Object name of one component in the test release (release name already says subsidy)."""
    return f"{RELEASE}-{service}"


def pod_spec(obj: Manifest) -> Manifest | None:
    """The pod template spec of a workload object, or None for non-workloads."""
    kind = obj["kind"]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        spec: Manifest = obj["spec"]["template"]["spec"]
        return spec
    if kind == "CronJob":
        spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    return None


def pod_metadata(obj: Manifest) -> Manifest:
    """The pod template metadata of a workload object."""
    if obj["kind"] == "CronJob":
        meta: Manifest = obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
        return meta
    meta = obj["spec"]["template"]["metadata"]
    return meta


def workloads(rel: Release) -> Iterator[tuple[Manifest, Manifest]]:
    """Every (object, pod spec) that runs containers."""
    for obj in rel.objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def containers(spec: Manifest) -> list[Manifest]:
    """Init and regular containers of a pod spec."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes LabelSelector matches these labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        wanted = expression.get("values", [])
        if operator == "In" and labels.get(key) not in wanted:
            return False
        if operator == "NotIn" and labels.get(key) in wanted:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def env_of(container: Manifest) -> dict[str, Manifest]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


# ---- what the policy, network, settings and topology tests share ---------------------------

NAMESPACE_LABELS = {"kubernetes.io/metadata.name": NAMESPACE}
SERVER = "server"


def server_labels(service: str) -> dict[str, str]:
    """Labels of a service's serving pods, as the chart's Deployment templates them."""
    return {
        "app.kubernetes.io/name": service,
        "app.kubernetes.io/instance": "subsidy",
        "app.kubernetes.io/component": SERVER,
    }


def deployment_of(rel: Release, service: str) -> Manifest:
    return rel.named("Deployment", component_name(service))


def pod_labels(obj: Manifest) -> dict[str, str]:
    labels: dict[str, str] = pod_metadata(obj)["labels"]
    return labels


def settings_of(rel: Release, service: str) -> dict[str, str]:
    data: dict[str, str] = rel.named("ConfigMap", component_name(service))["data"]
    return data


def resolve(rel: Release, address: str) -> Manifest:
    """The rendered Service a host:port setting points at (and check it serves that port)."""
    host, port = address.rsplit(":", 1)
    name, namespace, suffix = host.split(".", 2)
    assert (namespace, suffix) == (NAMESPACE, "svc"), address
    service = rel.named("Service", name)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}, address
    return service


def vault_annotations(obj: Manifest, prefix: str) -> dict[str, str]:
    annotations: dict[str, str] = pod_metadata(obj).get("annotations", {})
    return {k.removeprefix(prefix + "/"): v for k, v in annotations.items() if k.startswith(prefix)}


def policies_selecting(rel: Release, labels: dict[str, str], direction: str) -> list[Manifest]:
    return [
        p
        for p in rel.of_kind("NetworkPolicy")
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def peer_is_release_pod(peer: Manifest, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicyPeer admits a pod with these labels in the release namespace."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], NAMESPACE_LABELS):
        return False
    return selects(peer.get("podSelector", {}), labels)


def port_open(rule: Manifest, port: int) -> bool:
    return not rule.get("ports") or any(p["port"] == port for p in rule["ports"])


def may_connect(rel: Release, src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Kubernetes' verdict for a TCP connection between two pods of the release."""
    egress = policies_selecting(rel, src, "Egress")
    ingress = policies_selecting(rel, dst, "Ingress")
    leaves = not egress or any(
        port_open(rule, port) and any(peer_is_release_pod(peer, dst) for peer in rule["to"])
        for policy in egress
        for rule in policy["spec"].get("egress", [])
    )
    arrives = not ingress or any(
        port_open(rule, port) and any(peer_is_release_pod(peer, src) for peer in rule["from"])
        for policy in ingress
        for rule in policy["spec"].get("ingress", [])
    )
    return leaves and arrives


def networked(rel: Release) -> None:
    if not rel.effective["networkPolicy"]["enabled"]:
        pytest.skip("NetworkPolicies disabled in this profile")


Allowance = tuple[str, frozenset[tuple[int, str]]]


def allowances(rel: Release, policy: Manifest, direction: str) -> set[Allowance]:
    """A policy's rules as (who, ports): who is a role from the values, a release component,
    or an external CIDR; anything else shows up as its raw peer and fails the comparison."""
    values = rel.effective
    np = values["networkPolicy"]
    roles = {
        "platform": np["platformSelector"],
        "auditor": np["auditorSelector"],
        "prometheus": np["prometheusSelector"],
        "dns": np["dnsSelector"],
        "nats": values["nats"]["egressTo"],
        "postgresql": values["postgresql"]["egressTo"],
        "vault": values["vault"]["egressTo"],
        "otlp": values["otel"]["egressTo"],
    }
    key = "from" if direction == "ingress" else "to"
    found: set[Allowance] = set()
    for rule in policy["spec"].get(direction, []):
        ports = frozenset((p["port"], p.get("protocol", "TCP")) for p in rule["ports"])
        for peer in rule[key]:
            who = next((role for role, selector in roles.items() if peer == selector), None)
            if who is None and set(peer) == {"podSelector"}:
                labels = peer["podSelector"]["matchLabels"]
                if labels.get("app.kubernetes.io/instance") == "subsidy":
                    who = labels["app.kubernetes.io/name"]
            if who is None and set(peer) == {"ipBlock"}:
                who = f"cidr {peer['ipBlock']['cidr']}"
            found.add((who or repr(peer), ports))
    return found


def tcp(port: int) -> frozenset[tuple[int, str]]:
    return frozenset({(port, "TCP")})
