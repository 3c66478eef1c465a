"""The Grafana dashboard the chart ships: off by default, a ConfigMap the dashboard sidecar
loads when on, valid dashboard JSON, and every metric it queries one the services export."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from services.kernel import metrics
from tests.deploy.chart import CHART_DIR, Manifest, parse, release, render

DASHBOARD_FILE = CHART_DIR / "dashboards" / "subsidy-funds.json"
NAME = "subsidy-grafana-dashboard"
METRIC = re.compile(r"\bsubsidy_[a-z0-9_]+\b")
# What Prometheus calls the series of each kind of metric prometheus_client exports.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_series() -> set[str]:
    """Every series name the services' metrics (services/kernel/metrics.py) can export."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboards(objects: list[Manifest]) -> list[Manifest]:
    return [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})
    ]


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_off_by_default() -> None:
    assert dashboards(release("default").objects) == []
    assert dashboards(release("production").objects) == []


def test_on_it_is_a_configmap_the_sidecar_loads_with_the_dashboard_json() -> None:
    [cm] = dashboards(release("everything-on").objects)
    assert cm["metadata"]["name"] == NAME
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["subsidy-funds.json"]
    shipped = json.loads(cm["data"]["subsidy-funds.json"])
    assert shipped == json.loads(DASHBOARD_FILE.read_text())  # the file, unchanged


def test_label_value_folder_and_extra_labels_are_settable() -> None:
    values = {
        "metrics": {
            "grafanaDashboard": {
                "enabled": True,
                "labelValue": "subsidy",
                "folder": "Subsidy",
                "labels": {"team": "funds"},
            }
        }
    }
    [cm] = dashboards(parse(render(values)))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "subsidy"
    assert cm["metadata"]["labels"]["team"] == "funds"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Subsidy"}


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] == "subsidy-funds"
    assert dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "pool"} <= variables
    for panel in panels:
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # Money is fen in the metrics: every panel in yuan divides by 100.
    for panel in panels:
        if panel.get("fieldConfig", {}).get("defaults", {}).get("unit") == "currencyCNY":
            assert all(t["expr"].rstrip().endswith("/ 100") for t in panel["targets"])


def test_every_metric_it_queries_is_exported_by_the_services() -> None:
    exported = exported_series()
    assert "subsidy_budget_fen" in exported  # the helper sees the real metrics
    used = {
        name
        for expr in queries(json.loads(DASHBOARD_FILE.read_text()))
        for name in METRIC.findall(expr)
    }
    assert used, "the dashboard queries no metric"
    assert used - exported == set()
    # and it shows the money and the reservations, which is what it is for
    assert {"subsidy_budget_fen", "subsidy_budget_source_fen", "subsidy_reservations_total"} <= used
