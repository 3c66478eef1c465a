"""The risk engine's values as protobuf messages and back (risk.proto, events.proto): one
translation for eligibility's API and events and for the ledger's consumer. Pure."""

from __future__ import annotations

import datetime as dt
from typing import Any

from subsidy.v1 import events_pb2 as ev
from subsidy.v1 import risk_pb2

from .risk import (
    VELOCITY,
    Action,
    Kind,
    ListEntry,
    ListName,
    Rule,
    RuleSet,
    Verdict,
    parse_rule_set,
)

_RULE_FIELDS = (
    "rule_id",
    "kind",
    "action",
    "subject",
    "window_s",
    "max_count",
    "max_persons",
    "verdict",
)


def rule_set_document(message: risk_pb2.RiskRuleSet) -> dict[str, Any]:
    """A rule-set message as the plain document :func:`risk.parse_rule_set` checks: a field
    left empty or zero is absent, so a rule of one kind cannot carry another kind's fields."""
    rules = []
    for r in message.rules:
        rules.append({k: getattr(r, k) for k in _RULE_FIELDS if getattr(r, k)})
    return {"rules": rules}


def rule_set_of(message: risk_pb2.RiskRuleSet, version: int = 0) -> RuleSet:
    """The rule set a message holds (RuleSetError if it is not valid)."""
    return parse_rule_set(rule_set_document(message), version)


def rule_message(rule: Rule) -> risk_pb2.RiskRule:
    out = risk_pb2.RiskRule(
        rule_id=rule.rule_id,
        kind=rule.kind,
        action=str(rule.action),
        window_s=rule.window_s,
        verdict=str(rule.verdict),
    )
    if rule.kind == VELOCITY:
        out.subject = str(rule.subject)
        out.max_count = rule.limit
    else:
        out.max_persons = rule.limit
    return out


def rule_set_message(rules: RuleSet) -> risk_pb2.RiskRuleSet:
    return risk_pb2.RiskRuleSet(rules=[rule_message(r) for r in rules.rules])


def entry_of(message: risk_pb2.RiskListEntry) -> ListEntry:
    return ListEntry(
        entry_id=message.entry_id,
        list=ListName(message.list),
        kind=Kind(message.kind),
        index=message.subject_index,
        masked=message.subject_masked,
        expires_at=message.expires_at.ToDatetime(tzinfo=dt.UTC),
    )


def entry_message(entry: ListEntry, reason: str = "") -> risk_pb2.RiskListEntry:
    out = risk_pb2.RiskListEntry(
        entry_id=entry.entry_id,
        list=str(entry.list),
        kind=str(entry.kind),
        subject_index=entry.index,
        subject_masked=entry.masked,
        reason=reason,
    )
    out.expires_at.FromDatetime(entry.expires_at)
    return out


def decision_recorded(
    verdict: Verdict, decision_id: str, action: Action, consumer_id: str, reference: str
) -> ev.RiskDecisionRecorded:
    """The event of a decision that blocked or flagged: the rule, its version, what it used
    (masked) and the blind index of the subject it hit, never a raw value."""
    subject = verdict.subject
    return ev.RiskDecisionRecorded(
        decision_id=decision_id,
        action=str(action),
        outcome=str(verdict.outcome),
        rule_id=verdict.rule_id,
        rule_set_version=verdict.rule_set_version,
        lists_version=verdict.lists_version,
        inputs=dict(verdict.inputs),
        consumer_id=consumer_id,
        reference=reference,
        subject_kind=str(subject.kind) if subject else "",
        subject_index=subject.index if subject else "",
        subject_masked=subject.masked if subject else "",
        entry_id=verdict.entry_id,
        window_s=verdict.window_s,
    )
