"""The policy's optional ``supervision`` part: case deadlines and the operator-activity alarm.

Absent, it takes the defaults (first response 24 h, resolution 7 days, 20 overrides in 24 h)
and an old version's canonical forms stay exactly what they were; present, it reads back the
same from YAML/JSON and the ``subsidy.v1.Policy`` message, and every number is bounded.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.kernel.contract.policy import (
    PolicyError,
    Supervision,
    default_policy,
    policy_from_dict,
    policy_from_json,
    policy_from_proto,
    policy_json,
    policy_to_dict,
    policy_to_proto,
)


def document(supervision: object) -> dict[str, Any]:
    doc = policy_to_dict(default_policy())
    doc["supervision"] = supervision
    return doc


def test_a_policy_without_supervision_takes_the_defaults_and_keeps_its_canonical_form() -> None:
    old = default_policy()
    assert old.supervision == Supervision(24, 168, 20, 24)
    assert "supervision" not in policy_to_dict(old)
    assert not policy_to_proto(old).HasField("supervision")


def test_supervision_reads_back_the_same_from_json_and_the_message() -> None:
    policy = policy_from_dict(document({"first_response_hours": 4, "override_limit": 3}))
    assert policy.supervision == Supervision(
        first_response_hours=4, resolution_hours=168, override_limit=3, override_window_hours=24
    )
    assert policy_from_json(policy_json(policy)) == policy
    assert policy_from_proto(policy_to_proto(policy)) == policy


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ({"first_response_hours": 0}, "supervision.first_response_hours"),
        ({"resolution_hours": 9000}, "supervision.resolution_hours"),
        ({"first_response_hours": 48, "resolution_hours": 24}, "supervision.resolution_hours"),
        ({"override_limit": 0}, "supervision.override_limit"),
        ({"override_window_hours": 1.5}, "supervision.override_window_hours"),
        ({"sla": 1}, "supervision.sla"),
    ],
)
def test_a_bad_supervision_part_is_refused_naming_its_field(part: object, field: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_dict(document(part))
    assert err.value.path == field
