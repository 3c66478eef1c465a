"""The chart is sized from the checkout benchmark (docs/benchmarks.md, "Scale out by processes"):
each service's CPU request in proportion to the CPU it spends per checkout, a memory request
that holds the peak resident memory measured under the load, an HPA with headroom below its
target, and SUBSIDY_WORKERS from the values. Re-run `python -m bench.checkout` and re-size the
values (docs/operations.md, "Size a cluster") when these fail after a change to the hot path."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.chart import (
    REPO_ROOT,
    SERVICES,
    Release,
    component_name,
    deployment_of,
    parse,
    release,
    render,
)

MEASURED: dict[str, Any] = json.loads(
    (REPO_ROOT / "bench" / "results" / "checkout.json").read_text()
)
SIZED_PROFILES = ("default", "production")  # the profiles that autoscale on CPU


def millicores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def server_resources(rel: Release, service: str) -> dict[str, Any]:
    (container,) = deployment_of(rel, service)["spec"]["template"]["spec"]["containers"]
    resources: dict[str, Any] = container["resources"]
    return resources


def cpu_per_checkout(service: str) -> float:
    return float(MEASURED["cpu_ms_per_checkout"][service])


@pytest.mark.parametrize("profile", SIZED_PROFILES)
def test_cpu_requests_follow_the_measured_cpu_per_checkout(profile: str) -> None:
    rel = release(profile)
    requests = {s: millicores(server_resources(rel, s)["requests"]["cpu"]) for s in SERVICES}
    total_req, total_cpu = sum(requests.values()), sum(cpu_per_checkout(s) for s in SERVICES)
    for service in SERVICES:
        share, measured = requests[service] / total_req, cpu_per_checkout(service) / total_cpu
        assert abs(share - measured) <= 0.1, (service, round(share, 3), round(measured, 3))


@pytest.mark.parametrize("profile", SIZED_PROFILES)
def test_memory_requests_hold_the_peak_rss_under_the_checkout_load(profile: str) -> None:
    rel = release(profile)
    for service in SERVICES:
        peak = max(mb for who, mb in MEASURED["rss_mb"].items() if who.split("[")[0] == service)
        assert peak <= 200, f"{service}: {peak} MB, over the 200 MB per process target"
        resources = server_resources(rel, service)
        request, limit = (mebibytes(resources[k]["memory"]) for k in ("requests", "limits"))
        assert peak * 1.2 <= request <= limit, (service, peak, request, limit)


@pytest.mark.parametrize("profile", SIZED_PROFILES)
def test_the_hpa_keeps_headroom_for_a_burst(profile: str) -> None:
    rel = release(profile)
    for service in SERVICES:
        hpa = rel.named("HorizontalPodAutoscaler", component_name(service))["spec"]
        target = hpa["metrics"][0]["resource"]["target"]
        assert target["type"] == "Utilization"
        assert 50 <= target["averageUtilization"] <= 75, service
        assert hpa["maxReplicas"] >= 3 * hpa["minReplicas"] or hpa["maxReplicas"] >= 10


def test_workers_per_pod_come_from_the_values() -> None:
    objects = parse(render({"services": {"ledger": {"workers": 2}}}))
    settings = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    assert settings[component_name("ledger")]["SUBSIDY_WORKERS"] == "2"
    for service in ("catalog", "eligibility", "audit"):
        assert settings[component_name(service)]["SUBSIDY_WORKERS"] == "1"


def test_the_schema_refuses_zero_workers() -> None:
    with pytest.raises(Exception, match="workers"):
        render({"serviceDefaults": {"workers": 0}})
