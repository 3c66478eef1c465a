"""The RiskService servicer (served by the eligibility process): the edge of risk control,
where every request field is validated once, a rule-set document is checked strictly and
bounded, and a list entry's value is put in canonical form; the use cases in risk.py receive
clean values. Who may call what is in services/kernel/authz.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

from services.kernel import validate
from services.kernel.contract import circumstances as circ
from services.kernel.contract import risk
from services.kernel.contract.risk_proto import entry_message, rule_set_message, rule_set_of
from services.kernel.errors import InvalidArgument
from services.kernel.identity import caller
from services.kernel.rpc import ServicerContext
from subsidy.v1 import risk_pb2, risk_pb2_grpc

from . import risk_domain
from .risk import RiskControl

MAX_REASON = 500
MAX_LIMIT = 1000


def _change(change: risk_domain.RiskChange, activated: int) -> risk_pb2.RiskChange:
    out = risk_pb2.RiskChange(
        change_id=change.change_id,
        kind=change.kind,
        status=change.status,
        proposed_by=change.proposed_by,
        approved_by=change.approved_by,
        reason=change.reason,
        list_change=change.list_change,
        activated_version=activated,
    )
    if change.rules is not None:
        out.rule_set.CopyFrom(rule_set_message(change.rules))
    if change.entry is not None:
        out.entry.CopyFrom(entry_message(change.entry, change.entry_reason))
    return out


def _decision(row: dict[str, Any]) -> risk_pb2.RiskDecision:
    out = risk_pb2.RiskDecision(
        decision_id=row["decision_id"],
        service=row["service"],
        action=row["action"],
        outcome=row["outcome"],
        rule_id=row["rule_id"],
        rule_set_version=row["rule_set_version"],
        lists_version=row["lists_version"],
        inputs=json.loads(row["inputs"]),
        consumer_id=row["consumer_id"],
        reference=row["reference"],
        status=row["status"],
        lifted_by=row["lifted_by"],
        lift_reason=row["lift_reason"],
    )
    out.decided_at.FromDatetime(row["decided_at"])
    return out


def _invalid(exc: risk.RuleSetError) -> InvalidArgument:
    return InvalidArgument(exc.reason, str(exc), field=exc.path)


def _limit(value: int) -> int:
    if value < 0 or value > MAX_LIMIT:
        raise InvalidArgument("INVALID_LIMIT", f"limit: 0..{MAX_LIMIT} (0: 100)", field="limit")
    return value or 100


def _circumstance(check: Callable[[str], str]) -> Callable[[str], str]:
    def canonical(value: str) -> str:
        try:
            return check(value)
        except circ.InvalidCircumstance as exc:
            raise InvalidArgument(exc.reason, f"value: {exc}", field="value") from None

    return canonical


# The canonical form of a list entry's value, by kind (what the screen compares it with).
_CANONICAL: dict[risk.Kind, Callable[[str], str]] = {
    risk.Kind.PERSON: lambda v: validate.identifier("value", v),
    risk.Kind.DEVICE: _circumstance(circ.validate_device_id),
    risk.Kind.ADDRESS: _circumstance(circ.normalise_address),
    risk.Kind.MERCHANT: lambda v: validate.identifier("value", v),
    risk.Kind.SERIAL: lambda v: validate.serial("value", v),
}


class RiskApi(risk_pb2_grpc.RiskServiceServicer):
    def __init__(self, control: RiskControl) -> None:
        self.control = control

    async def ProposeRules(
        self, request: risk_pb2.ProposeRulesRequest, context: ServicerContext
    ) -> risk_pb2.RiskChange:
        reason = validate.text_field("reason", request.reason, max_len=MAX_REASON)
        try:
            risk.check_document_size(request.rule_set.ByteSize())
            rules = rule_set_of(request.rule_set)
        except risk.RuleSetError as exc:
            raise _invalid(exc) from None
        change = await self.control.propose_rules(rules, reason, caller().actor(reason))
        return _change(change, 0)

    async def ProposeListChange(
        self, request: risk_pb2.ProposeListChangeRequest, context: ServicerContext
    ) -> risk_pb2.RiskChange:
        change = validate.choice("change", request.change, (risk_domain.ADD, risk_domain.REMOVE))
        reason = validate.text_field("reason", request.reason, max_len=MAX_REASON)
        actor = caller().actor(reason)
        if change == risk_domain.REMOVE:
            entry_id = validate.identifier("entry_id", request.entry_id)
            proposed = await self.control.propose_list_change(
                change, None, entry_id, "", reason, actor
            )
            return _change(proposed, 0)
        name = risk.ListName(validate.choice("list", request.list, tuple(risk.ListName)))
        kind = risk.Kind(validate.choice("kind", request.kind, tuple(risk.LIST_KINDS)))
        if not request.value:
            raise InvalidArgument("MISSING_FIELD", "value: required", field="value")
        value = _CANONICAL[kind](request.value)
        now = self.control.clock()
        expires = self._expiry(request, now)
        subject = await self.control.subject(kind, value)
        entry = risk.ListEntry(
            f"rle-{uuid.uuid4().hex}", name, kind, subject.index, subject.masked, expires
        )
        proposed = await self.control.propose_list_change(change, entry, "", reason, reason, actor)
        return _change(proposed, 0)

    @staticmethod
    def _expiry(request: risk_pb2.ProposeListChangeRequest, now: dt.datetime) -> dt.datetime:
        if not request.HasField("expires_at"):
            raise InvalidArgument("MISSING_FIELD", "expires_at: required", field="expires_at")
        expires = validate.timestamp("expires_at", request.expires_at)
        if not now < expires <= now + dt.timedelta(days=risk.MAX_LIST_DAYS):
            raise InvalidArgument(
                "INVALID_EXPIRY",
                f"expires_at: in the future, within {risk.MAX_LIST_DAYS} days",
                field="expires_at",
            )
        return expires

    async def ApproveChange(
        self, request: risk_pb2.ApproveRiskChangeRequest, context: ServicerContext
    ) -> risk_pb2.RiskChange:
        change_id = validate.identifier("change_id", request.change_id, max_len=80)
        reason = validate.text_field("reason", request.reason, max_len=MAX_REASON, required=False)
        who = caller()
        cmd = risk_domain.Approve(change_id, who.name, reason)
        return _change(*await self.control.approve(cmd, who.actor(reason)))

    async def GetChange(
        self, request: risk_pb2.GetRiskChangeRequest, context: ServicerContext
    ) -> risk_pb2.RiskChange:
        change_id = validate.identifier("change_id", request.change_id, max_len=80)
        return _change(*await self.control.change(change_id))

    async def ListRules(
        self, request: risk_pb2.ListRiskRulesRequest, context: ServicerContext
    ) -> risk_pb2.RiskRules:
        version, rules, activated_at, pending = await self.control.rules()
        out = risk_pb2.RiskRules(
            version=version,
            rule_set=rule_set_message(rules),
            pending=[_change(c, 0) for c in pending],
        )
        if activated_at is not None:
            out.activated_at.FromDatetime(activated_at)
        return out

    async def ListLists(
        self, request: risk_pb2.ListRiskListsRequest, context: ServicerContext
    ) -> risk_pb2.RiskLists:
        name = validate.choice("list", request.list, ("", *risk.ListName))
        kind = validate.choice("kind", request.kind, ("", *risk.Kind))
        version, entries = await self.control.lists(name, kind, _limit(request.limit))
        return risk_pb2.RiskLists(
            version=version, entries=[entry_message(e, reason) for e, reason in entries]
        )

    async def ListDecisions(
        self, request: risk_pb2.ListRiskDecisionsRequest, context: ServicerContext
    ) -> risk_pb2.RiskDecisions:
        outcome = validate.choice(
            "outcome", request.outcome, ("", risk.Outcome.BLOCK, risk.Outcome.FLAG)
        )
        status = validate.choice(
            "status", request.status, ("", risk_domain.OPEN, risk_domain.LIFTED)
        )
        rows = await self.control.decisions(outcome, status, _limit(request.limit))
        return risk_pb2.RiskDecisions(decisions=[_decision(r) for r in rows])

    async def LiftBlock(
        self, request: risk_pb2.LiftBlockRequest, context: ServicerContext
    ) -> risk_pb2.RiskDecision:
        decision_id = validate.identifier("decision_id", request.decision_id)
        reason = validate.text_field("reason", request.reason, max_len=MAX_REASON)
        longest = risk.MAX_LIST_DAYS * 86400
        if not 0 <= request.exempt_for_s <= longest:
            raise InvalidArgument(
                "INVALID_EXEMPTION",
                f"exempt_for_s: 0..{longest} (0: the rule's window)",
                field="exempt_for_s",
            )
        row = await self.control.lift(
            decision_id, reason, request.exempt_for_s, caller().actor(reason)
        )
        return _decision(row)
