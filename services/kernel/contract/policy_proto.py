"""The policy as the contract: conversion to and from the ``subsidy.v1.Policy`` message.

``PolicyPublished`` and ``PolicyDrafted`` carry the policy as this message
(``proto/subsidy/v1/policy.proto``); a message is validated exactly as a YAML document is, by
turning it into the same plain document. Import it through :mod:`.policy`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Final, TypeVar

from services.kernel.contract.policy_document import hhmm_text, policy_from_dict, policy_from_json
from services.kernel.contract.policy_model import (
    DEFAULT_EVIDENCE_DAYS,
    FundingRules,
    Group,
    PaidAmount,
    Policy,
    PolicyError,
    RefundRule,
    Rounding,
    Split,
    Supervision,
)
from subsidy.v1 import events_pb2, policy_pb2

_E = TypeVar("_E", bound=StrEnum)

_PB = policy_pb2.Policy
_ROUNDING_PB: Final = {Rounding.DOWN: _PB.ROUNDING_DOWN, Rounding.HALF_UP: _PB.ROUNDING_HALF_UP}
_REFUND_PB: Final = {
    RefundRule.RESTORE: _PB.REFUND_RULE_RESTORE,
    RefundRule.FORFEIT: _PB.REFUND_RULE_FORFEIT,
    RefundRule.RESTORE_NEXT_DAY: _PB.REFUND_RULE_RESTORE_NEXT_DAY,
}
_SPLIT_PB: Final = {
    Split.PRIORITY: policy_pb2.Funding.SPLIT_PRIORITY,
    Split.PRO_RATA: policy_pb2.Funding.SPLIT_PRO_RATA,
}
_PAID_PB: Final = {
    PaidAmount.FLAG: policy_pb2.Funding.PAID_AMOUNT_FLAG,
    PaidAmount.REFUSE: policy_pb2.Funding.PAID_AMOUNT_REFUSE,
}
_GROUP_PB: Final = {
    Group.NATIONAL_APPLIANCE: policy_pb2.CategoryRule.GROUP_NATIONAL_APPLIANCE,
    Group.CITY_APPLIANCE: policy_pb2.CategoryRule.GROUP_CITY_APPLIANCE,
    Group.DIGITAL: policy_pb2.CategoryRule.GROUP_DIGITAL,
}


def _enum_word(mapping: Mapping[_E, int], number: int) -> str:
    # UNSPECIFIED, or a number this code does not know, becomes "" and is refused by the
    # document's validation.
    return next((member.value for member, n in mapping.items() if n == number), "")


def policy_to_proto(policy: Policy) -> policy_pb2.Policy:
    """The policy as the ``subsidy.v1.Policy`` message events carry (exact: it converts back
    to an equal Policy, with ``effective_from`` in the UTC offset it was written in)."""
    offset = policy.effective_from.utcoffset() or dt.timedelta(0)
    message = policy_pb2.Policy(
        version=policy.version,
        effective_from_utc_offset_seconds=int(offset.total_seconds()),
        campaign=policy_pb2.Campaign(
            name=policy.campaign.name,
            area=policy.campaign.area,
            regions=policy.campaign.regions,
        ),
        rounding=_ROUNDING_PB[policy.rounding],
        price_tolerance_bp=policy.price_tolerance_bp,
        baseline_window_days=policy.baseline_window_days,
        claim_window=policy_pb2.ClaimWindow(
            opens=hhmm_text(policy.claim_window.opens),
            closes=hhmm_text(policy.claim_window.closes),
            timezone=policy.claim_window.timezone,
        ),
        qualification_validity_days=policy.qualification_validity_days,
        reclaim_limit=policy.reclaim_limit,
        refund_rule=_REFUND_PB[policy.refund_rule],
    )
    message.effective_from.FromDatetime(policy.effective_from.astimezone(dt.UTC))
    rules = policy.funding
    if rules != FundingRules():  # absent means the defaults: old versions stay byte-identical
        message.funding.CopyFrom(
            policy_pb2.Funding(
                sources=rules.sources,
                split=_SPLIT_PB[rules.split],
                priority=rules.priority,
                alert_thresholds_bp=rules.alert_thresholds_bp,
                sub_budgets=[
                    policy_pb2.SubBudget(category=c, share_bp=bp) for c, bp in rules.sub_budgets
                ],
                # The default stays unspecified (unwritten): old versions keep their bytes.
                paid_amount=(
                    _PAID_PB[rules.paid_amount]
                    if rules.paid_amount is not PaidAmount.FLAG
                    else policy_pb2.Funding.PAID_AMOUNT_UNSPECIFIED
                ),
                evidence_days=(
                    rules.evidence_days if rules.evidence_days != DEFAULT_EVIDENCE_DAYS else 0
                ),
            )
        )
    if policy.supervision != Supervision():  # absent means the defaults, as for funding
        message.supervision.CopyFrom(
            policy_pb2.Supervision(
                first_response_hours=policy.supervision.first_response_hours,
                resolution_hours=policy.supervision.resolution_hours,
                override_limit=policy.supervision.override_limit,
                override_window_hours=policy.supervision.override_window_hours,
            )
        )
    for rule in policy.categories:
        part = message.categories.add(
            code=rule.code,
            name_zh=rule.name_zh,
            name_en=rule.name_en,
            group=_GROUP_PB[rule.group],
            grades=[policy_pb2.GradeRate(grade=g, rate_bp=r) for g, r in rule.grades],
            cap_fen=rule.cap_fen,
            per_person_limit=rule.per_person_limit,
            daily_quota=rule.daily_quota,
        )
        if rule.no_grade_rate_bp is not None:
            part.no_grade_rate_bp = rule.no_grade_rate_bp
        if rule.price_ceiling_fen is not None:
            part.price_ceiling_fen = rule.price_ceiling_fen
    return message


def _proto_document(message: policy_pb2.Policy) -> dict[str, object]:
    """The message as the plain document :func:`policy_from_dict` validates."""
    if not message.HasField("effective_from"):
        raise PolicyError("effective_from", "is required")
    try:
        zone = dt.timezone(dt.timedelta(seconds=message.effective_from_utc_offset_seconds))
    except ValueError:
        raise PolicyError(
            "effective_from_utc_offset_seconds", "must be strictly between -24 h and +24 h"
        ) from None
    categories: list[dict[str, object]] = []
    for index, rule in enumerate(message.categories):
        grades: dict[int, int] = {}
        for rate in rule.grades:
            if rate.grade in grades:  # a mapping in YAML; a repeated field could hold one twice
                raise PolicyError(f"categories[{index}].grades[{rate.grade}]", "duplicate grade")
            grades[rate.grade] = rate.rate_bp
        categories.append(
            {
                "code": rule.code,
                "name_zh": rule.name_zh,
                "name_en": rule.name_en,
                "group": _enum_word(_GROUP_PB, rule.group),
                "grades": grades,
                "no_grade_rate_bp": (
                    rule.no_grade_rate_bp if rule.HasField("no_grade_rate_bp") else None
                ),
                "cap_fen": rule.cap_fen,
                "price_ceiling_fen": (
                    rule.price_ceiling_fen if rule.HasField("price_ceiling_fen") else None
                ),
                "per_person_limit": rule.per_person_limit,
                "daily_quota": rule.daily_quota,
            }
        )
    campaign: dict[str, object] = {"name": message.campaign.name, "area": message.campaign.area}
    if message.campaign.regions:  # a policy published before regions existed: the area alone
        campaign["regions"] = list(message.campaign.regions)
    document: dict[str, object] = {
        "version": message.version,
        "effective_from": message.effective_from.ToDatetime(tzinfo=dt.UTC).astimezone(zone),
        "campaign": campaign,
        "rounding": _enum_word(_ROUNDING_PB, message.rounding),
        "price_tolerance_bp": message.price_tolerance_bp,
        "baseline_window_days": message.baseline_window_days,
        "claim_window": {
            "opens": message.claim_window.opens,
            "closes": message.claim_window.closes,
            "timezone": message.claim_window.timezone,
        },
        "qualification_validity_days": message.qualification_validity_days,
        "reclaim_limit": message.reclaim_limit,
        "refund_rule": _enum_word(_REFUND_PB, message.refund_rule),
        "categories": categories,
    }
    if message.HasField("funding"):  # absent: a policy published before funding rules
        document["funding"] = _funding_document(message.funding)
    if message.HasField("supervision"):  # absent: a policy published before supervision
        part = message.supervision
        document["supervision"] = {
            "first_response_hours": part.first_response_hours,
            "resolution_hours": part.resolution_hours,
            "override_limit": part.override_limit,
            "override_window_hours": part.override_window_hours,
        }
    return document


def _funding_document(funding: policy_pb2.Funding) -> dict[str, object]:
    shares: dict[str, int] = {}
    for index, part in enumerate(funding.sub_budgets):
        if part.category in shares:  # a mapping in YAML; a repeated field could hold one twice
            raise PolicyError(f"funding.sub_budgets[{index}]", "duplicate category")
        shares[part.category] = part.share_bp
    document: dict[str, object] = {
        "sources": list(funding.sources),
        "priority": list(funding.priority),
        "alert_thresholds_bp": list(funding.alert_thresholds_bp),
        "sub_budgets_bp": shares,
    }
    if funding.split != policy_pb2.Funding.SPLIT_UNSPECIFIED:  # unspecified: the default
        document["split"] = _enum_word(_SPLIT_PB, funding.split)
    if funding.paid_amount != policy_pb2.Funding.PAID_AMOUNT_UNSPECIFIED:  # the default: flag
        document["paid_amount"] = _enum_word(_PAID_PB, funding.paid_amount)
    if funding.evidence_days:  # 0: the default
        document["evidence_days"] = funding.evidence_days
    return document


def policy_from_proto(message: policy_pb2.Policy) -> Policy:
    """Validate a ``subsidy.v1.Policy`` message exactly as a YAML document and build the Policy.

    Raises :class:`PolicyError` naming the first offending field, e.g. ``rounding`` for an
    enum left at UNSPECIFIED or ``categories[3].cap_fen``.
    """
    return policy_from_dict(_proto_document(message))


def policy_of(event: events_pb2.PolicyPublished | events_pb2.PolicyDrafted) -> Policy:
    """The policy an event carries: its ``policy`` message, or, in events written before the
    policy had a message of its own, its canonical JSON ``policy_json``."""
    if event.HasField("policy"):
        return policy_from_proto(event.policy)
    return policy_from_json(event.policy_json)
