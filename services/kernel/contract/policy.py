"""Subsidy policy: the campaign rules as versioned data, the version in force, and the quote.

The one public surface of the policy contract: import every name from here. The document has
three forms, converted with one validation, and the parts live in three modules:

- :mod:`.policy_model`: the :class:`Policy` model code reads, "the version in force at T"
  (:func:`in_force`), a named version (:func:`named_version`, an unknown one is an error,
  never another version), and the per-item :func:`quote` arithmetic;
- :mod:`.policy_document`: the YAML file people edit and its validation
  (:func:`load_policy`, :func:`policy_from_dict`), the canonical JSON (:func:`policy_json`,
  :func:`policy_from_json`) and the shipped :func:`default_policy`;
- :mod:`.policy_proto`: the ``subsidy.v1.Policy`` message events carry
  (``proto/subsidy/v1/policy.proto``) and :func:`policy_of` an event.

Both catalog and eligibility decide with these, so no rule is read in two services.
Everything is pure except reading a policy file. Money is integer fen; percentages are
integer basis points (1 bp = 0.01 %).
"""

from __future__ import annotations

from services.kernel.contract.limits import MAX_GRADE, MAX_PRICE_FEN, MIN_GRADE, MIN_PRICE_FEN
from services.kernel.contract.policy_document import (
    DEFAULT_POLICY_RESOURCE,
    default_policy,
    load_policy,
    policy_from_dict,
    policy_from_json,
    policy_from_text,
    policy_json,
    policy_to_dict,
)
from services.kernel.contract.policy_model import (
    BP_DENOMINATOR,
    GRADE_NOT_ELIGIBLE,
    INVALID_GRADE,
    INVALID_PRICE,
    NO_GRADE_NOT_ELIGIBLE,
    PRICE_ABOVE_CEILING,
    QUOTE_REASONS,
    UNKNOWN_CATEGORY,
    Campaign,
    CategoryRule,
    ClaimWindow,
    FundingRules,
    Group,
    PaidAmount,
    Policy,
    PolicyError,
    Quote,
    RefundRule,
    Rounding,
    Split,
    Supervision,
    apply_bp,
    in_force,
    named_version,
    quote,
)
from services.kernel.contract.policy_proto import policy_from_proto, policy_of, policy_to_proto

__all__ = [
    "BP_DENOMINATOR",
    "DEFAULT_POLICY_RESOURCE",
    "GRADE_NOT_ELIGIBLE",
    "INVALID_GRADE",
    "INVALID_PRICE",
    "MAX_GRADE",
    "MAX_PRICE_FEN",
    "MIN_GRADE",
    "MIN_PRICE_FEN",
    "NO_GRADE_NOT_ELIGIBLE",
    "PRICE_ABOVE_CEILING",
    "QUOTE_REASONS",
    "UNKNOWN_CATEGORY",
    "Campaign",
    "CategoryRule",
    "ClaimWindow",
    "FundingRules",
    "Group",
    "PaidAmount",
    "Policy",
    "PolicyError",
    "Quote",
    "RefundRule",
    "Rounding",
    "Split",
    "Supervision",
    "apply_bp",
    "default_policy",
    "in_force",
    "load_policy",
    "named_version",
    "policy_from_dict",
    "policy_from_json",
    "policy_from_proto",
    "policy_from_text",
    "policy_json",
    "policy_of",
    "policy_to_dict",
    "policy_to_proto",
    "quote",
]
