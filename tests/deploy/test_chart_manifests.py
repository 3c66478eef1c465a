"""The chart lints clean and every object it renders is valid Kubernetes.

Each test runs once per values profile (defaults, values-production.yaml, values-dev.yaml, and
the defaults with every optional part on), against the offline schemas of a fixed Kubernetes
version, in strict mode: a misspelt or misplaced field fails, not just a missing one.
"""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate

from tests.deploy.chart import CHART_DIR, KUBE_VERSION, NAMESPACE, SERVICES, Release, selects

# Kinds defined by CustomResourceDefinitions, not by Kubernetes itself: kubernetes-validate
# ships no schema for them, so they are checked by hand below instead. Any other kind without
# a schema fails the validation test.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),  # checked in test_chart_alerts.py
    ("cert-manager.io/v1", "Certificate"),  # checked in test_chart_tls.py
}

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


def test_helm_lint_is_clean(rel: Release) -> None:
    report = helm.lint(
        CHART_DIR,
        rel.values or None,
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert report["errors"] == [] and problems == [], report


def test_every_object_is_valid_kubernetes(rel: Release) -> None:
    failures = []
    for obj in rel.objects:
        what = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            failures.append(f"{what}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            failures.append(f"{what}: {error.message}")
    assert not failures, "\n".join(failures)


def test_every_object_has_a_unique_name_and_the_release_labels(rel: Release) -> None:
    seen = set()
    for obj in rel.objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"two objects named {key}"
        seen.add(key)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "subsidy", key
        assert labels["app.kubernetes.io/managed-by"] == "Helm", key


def test_service_monitor_is_absent_when_disabled_and_well_formed_when_enabled(
    rel: Release,
) -> None:
    monitors = rel.of_kind("ServiceMonitor")
    if not rel.values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        # Without the Prometheus Operator the CRD does not exist: rendering one would fail.
        assert monitors == []
        return
    # No offline schema for this CRD: check the fields the Prometheus Operator requires.
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]
    assert selector.get("matchLabels") or selector.get("matchExpressions")
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints, "a ServiceMonitor without endpoints scrapes nothing"
    scraped = [s for s in rel.of_kind("Service") if selects(selector, s["metadata"]["labels"])]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/name"] for s in scraped) == sorted(
        SERVICES
    )
    for endpoint in endpoints:
        assert endpoint["path"] == "/metrics"
        for service in scraped:
            port_names = {p["name"] for p in service["spec"]["ports"]}
            assert endpoint["port"] in port_names, service["metadata"]["name"]
