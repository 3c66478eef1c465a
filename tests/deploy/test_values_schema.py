"""values.schema.json stops bad values before anything reaches a cluster.

Each case renders the chart through Helm, which validates the coalesced values against the
schema first, and asserts the render fails with Helm's schema error naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.chart import CHART_DIR, render

SCHEMA_ERROR = "values don't meet the specifications of the schema"


def schema_error(values: dict[str, Any]) -> str:
    """Render with ``values``; return Helm's error text (the test fails if rendering works)."""
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    assert SCHEMA_ERROR in message, message
    return message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"serviceDefaults": {"replicas": "three"}},
            "at '/serviceDefaults/replicas': got string, want integer",
        ),
        (
            {"services": {"ledger": {"replicas": "three"}}},
            "at '/services/ledger/replicas': got string, want integer",
        ),
        ({"grpc": {"port": "50051"}}, "at '/grpc/port': got string, want integer"),
        (
            {"networkPolicy": {"enabled": "yes"}},
            "at '/networkPolicy/enabled': got string, want boolean",
        ),
        ({"grpc": {"port": 70000}}, "at '/grpc/port'"),
        ({"logLevel": "LOUD"}, "at '/logLevel'"),
        ({"serviceDefaults": {"podDisruptionBudget": {"rule": "minUnavailable"}}}, "rule"),
    ],
    ids=[
        "replicas-default",
        "replicas-service",
        "port",
        "bool",
        "port-range",
        "log-level",
        "pdb-rule",
    ],
)
def test_a_wrong_type_or_value_is_rejected(values: dict[str, Any], expected: str) -> None:
    assert expected in schema_error(values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
        ({"networkPolicy": {"enable": False}}, "additional properties 'enable' not allowed"),
        ({"services": {"payments": {}}}, "additional properties 'payments' not allowed"),
        ({"services": {"ledger": {"databse": {}}}}, "additional properties 'databse' not allowed"),
        # There is nowhere to put a password: secrets live in Vault only.
        (
            {"services": {"ledger": {"database": {"password": "hunter2"}}}},
            "additional properties 'password' not allowed",
        ),
        ({"postgresql": {"password": "hunter2"}}, "additional properties 'password' not allowed"),
        (
            {"nats": {"egressTo": {"podSelectr": {}}}},
            "additional properties 'podSelectr' not allowed",
        ),
    ],
    ids=[
        "top-level",
        "nested",
        "unknown-service",
        "typo",
        "db-password",
        "pg-password",
        "selector",
    ],
)
def test_an_unknown_key_is_rejected(values: dict[str, Any], expected: str) -> None:
    assert expected in schema_error(values)


def test_the_same_values_with_the_mistake_fixed_render() -> None:
    # The cases above fail because of the mistake, not because the overrides are unusable.
    render({"serviceDefaults": {"replicas": 3}, "services": {"ledger": {"replicas": 3}}})


def objects_in(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every sub-schema of type object, with its JSON pointer."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            yield path, schema
        for key, value in schema.items():
            yield from objects_in(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from objects_in(value, f"{path}/{index}")


def test_every_object_the_schema_defines_is_closed() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = [
        path
        for path, sub in objects_in(schema)
        if "properties" in sub and sub.get("additionalProperties") is not False
    ]
    assert open_objects == []
