"""The policy's optional ``funding`` part: sources, split rule, alert thresholds, sub-budgets.

Validated like every other part of the document (an error names its field path), the same in
YAML, JSON and the ``subsidy.v1.Policy`` message; absent, it takes the defaults old versions
meant, and an old version's canonical forms stay exactly what they were.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.kernel.contract.policy import (
    FundingRules,
    PolicyError,
    Split,
    default_policy,
    policy_from_dict,
    policy_from_json,
    policy_from_proto,
    policy_json,
    policy_to_dict,
    policy_to_proto,
)
from subsidy.v1 import policy_pb2

FUNDING = {
    "sources": ["district", "platform-matching"],
    "split": "pro_rata",
    "alert_thresholds_bp": [5000, 8000, 9500],
    "sub_budgets_bp": {"projector": 1000, "phone": 3000},
}


def document(funding: object) -> dict[str, Any]:
    doc = policy_to_dict(default_policy())
    doc["funding"] = funding
    return doc


def test_a_policy_without_funding_rules_takes_the_defaults_and_keeps_its_canonical_form() -> None:
    old = default_policy()
    assert old.funding == FundingRules()
    assert old.funding.split is Split.PRIORITY and old.funding.accepts("anything")
    assert "funding" not in policy_to_dict(old)
    assert not policy_to_proto(old).HasField("funding")
    assert '"funding"' not in policy_json(old)


def test_funding_rules_read_back_the_same_from_yaml_json_and_the_message() -> None:
    policy = policy_from_dict(document(FUNDING))
    assert policy.funding == FundingRules(
        sources=("district", "platform-matching"),
        split=Split.PRO_RATA,
        alert_thresholds_bp=(5000, 8000, 9500),
        # In the policy's category order, whatever order the document wrote them in.
        sub_budgets=(("projector", 1000), ("phone", 3000)),
    )
    assert policy_from_json(policy_json(policy)) == policy
    assert policy_from_proto(policy_to_proto(policy)) == policy
    assert policy.funding.sub_budget_bp("phone") == 3000
    assert policy.funding.sub_budget_bp("tv") is None
    assert not policy.funding.accepts("lottery")


def test_every_key_is_optional() -> None:
    assert policy_from_dict(document({})).funding == FundingRules()
    priority = policy_from_dict(document({"priority": ["platform-matching"]})).funding
    assert (priority.split, priority.priority) == (Split.PRIORITY, ("platform-matching",))


@pytest.mark.parametrize(
    ("funding", "path"),
    [
        ({"budget": 1}, "funding.budget"),
        ({"split": "half"}, "funding.split"),
        ({"sources": ["district", "district"]}, "funding.sources[1]"),
        ({"sources": ["District"]}, "funding.sources[0]"),
        ({"split": "pro_rata", "priority": ["district"]}, "funding.priority"),
        ({"sources": ["district"], "priority": ["platform"]}, "funding.priority[0]"),
        ({"alert_thresholds_bp": [8000, 5000]}, "funding.alert_thresholds_bp[1]"),
        ({"alert_thresholds_bp": [0]}, "funding.alert_thresholds_bp[0]"),
        ({"alert_thresholds_bp": [10_001]}, "funding.alert_thresholds_bp[0]"),
        ({"sub_budgets_bp": {"yacht": 1000}}, "funding.sub_budgets_bp['yacht']"),
        ({"sub_budgets_bp": {"phone": 0}}, "funding.sub_budgets_bp.phone"),
        ({"sub_budgets_bp": {"phone": 1.5}}, "funding.sub_budgets_bp.phone"),
        ([], "funding"),
    ],
)
def test_a_malformed_funding_part_is_refused_naming_its_field(funding: object, path: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_dict(document(funding))
    assert err.value.path == path


def test_the_message_form_is_validated_the_same_way() -> None:
    message = policy_to_proto(policy_from_dict(document(FUNDING)))
    message.funding.split = policy_pb2.Funding.SPLIT_UNSPECIFIED  # unspecified: the default
    assert policy_from_proto(message).funding.split is Split.PRIORITY
    message.funding.sub_budgets.add(category="phone", share_bp=10)
    with pytest.raises(PolicyError) as err:
        policy_from_proto(message)
    assert err.value.path == "funding.sub_budgets[2]"
