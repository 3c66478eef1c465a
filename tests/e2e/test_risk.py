"""Real-time risk control on the real stack (issue 10, "Real-time risk"): rule sets and lists
changed maker-checker through eligibility's RiskService, enforced in-process by claims
(eligibility) and reservations (ledger) within a second of the approval, every block and flag an
event an operator reviews and can lift, and no raw personal data anywhere.

The rule set is global to the session's platform: every test here puts back the rule set it
found (``rules_restored``), and list entries name subjects no other test uses.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text

from services.eligibility import risk_projections
from services.kernel.identity import Caller, Role
from services.kernel.riskscreen import ActiveRisk
from subsidy.v1 import common_pb2, eligibility_pb2, ledger_pb2, risk_pb2, risk_pb2_grpc
from subsidyctl.demo import DEMO_REGION
from tests.e2e.conftest import Platform, eventually, status_of
from tests.support.callers import CallerRouter

OPERATOR = Caller(Role.OPERATOR, "risk-li")
APPROVER = Caller(Role.APPROVER, "risk-wang")
SAME_PERSON = Caller(Role.APPROVER, "risk-li")  # the operator, holding an approver certificate
AUDITOR = Caller(Role.AUDITOR, "risk-zhao")
PLATFORM = Caller(Role.PLATFORM, "jd")
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
FRIDGE = "refrigerator"
FRIDGE_PRICE = 1_200_000


class Risk:
    """RiskService as each kind of person calls it."""

    def __init__(self, p: Platform) -> None:
        target = f"127.0.0.1:{p.running['eligibility'].port}"
        router = CallerRouter(target, p.infra.identities)
        self.routers = [router.as_caller(who) for who in (OPERATOR, APPROVER, SAME_PERSON)]
        self.routers += [router.as_caller(AUDITOR), router.as_caller(PLATFORM)]
        self.operator, self.approver, self.same_person, self.auditor, self.platform = (
            risk_pb2_grpc.RiskServiceStub(r) for r in self.routers
        )

    async def close(self) -> None:
        for r in self.routers:
            await r.close()

    async def activate(self, rules: list[dict[str, Any]], reason: str = "test") -> int:
        """Propose and approve a rule set; the rule-set version it made."""
        proposed = await self.operator.ProposeRules(
            risk_pb2.ProposeRulesRequest(rule_set=rule_set(rules), reason=reason)
        )
        approved = await self.approver.ApproveChange(
            risk_pb2.ApproveRiskChangeRequest(change_id=proposed.change_id, reason="ok")
        )
        return approved.activated_version

    async def add(self, kind: str, value: str, name: str = "block", hours: int = 1) -> int:
        """Propose and approve one list entry; the lists version it made."""
        proposed = await self.operator.ProposeListChange(
            list_change("add", name, kind, value, hours)
        )
        approved = await self.approver.ApproveChange(
            risk_pb2.ApproveRiskChangeRequest(change_id=proposed.change_id)
        )
        assert approved.status == "APPROVED"
        return approved.activated_version


def rule_set(rules: list[dict[str, Any]]) -> risk_pb2.RiskRuleSet:
    return risk_pb2.RiskRuleSet(rules=[risk_pb2.RiskRule(**r) for r in rules])


def velocity(
    rule_id: str, subject: str, max_count: int, action: str = "claim", verdict: str = "block"
) -> dict[str, Any]:
    return {
        "rule_id": rule_id,
        "kind": "velocity",
        "action": action,
        "subject": subject,
        "window_s": 3600,
        "max_count": max_count,
        "verdict": verdict,
    }


def list_change(
    change: str, name: str, kind: str, value: str, hours: int = 1
) -> risk_pb2.ProposeListChangeRequest:
    expires = Timestamp()
    expires.FromDatetime(datetime.now(UTC) + timedelta(hours=hours))
    return risk_pb2.ProposeListChangeRequest(
        change=change, list=name, kind=kind, value=value, expires_at=expires, reason="audit 2025"
    )


@pytest.fixture
async def risk(platform: Platform) -> AsyncIterator[Risk]:
    """RiskService stubs; the rule set in force before the test is in force again after it."""
    r = Risk(platform)
    before = await r.auditor.ListRules(risk_pb2.ListRiskRulesRequest())
    try:
        yield r
    finally:
        now = await r.auditor.ListRules(risk_pb2.ListRiskRulesRequest())
        if now.version != before.version:
            await r.activate(
                [{f.name: v for f, v in rule.ListFields()} for rule in before.rule_set.rules],
                reason="put back after a test",
            )
        await r.close()


def active_copy(p: Platform, service: str) -> ActiveRisk:
    """The running service's in-memory copy of the rules and lists (what its screen uses)."""
    for loop in p.running[service].wiring.background:
        owner = getattr(loop, "__self__", None)
        if isinstance(owner, ActiveRisk):
            return owner
    raise AssertionError(f"{service} runs no risk refresh loop")


def circumstances(**fields: str) -> common_pb2.Circumstances:
    """``fields``, from inside the campaign's region (the claim rule's, not the risk rules')."""
    return common_pb2.Circumstances(**({"region_code": DEMO_REGION} | fields))


def device(rng: random.Random) -> str:
    return f"dev-{rng.randrange(16**12):012x}"


async def claim(
    p: Platform, consumer: str, c: common_pb2.Circumstances, category: str = FRIDGE
) -> eligibility_pb2.Qualification:
    return await p.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            consumer_id=consumer, category=category, channel="jd", circumstances=c
        )
    )


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str, str]:
    """(code, reason, field, message) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return (*status_of(caught.value), caught.value.details() or "")


async def within(seconds: float, ready: Callable[[], bool]) -> float:
    """How long until ``ready()`` holds; fails after ``seconds``."""
    started = time.monotonic()
    while not ready():
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def event_counts(p: Platform) -> dict[str, int]:
    await p.quiesce()
    return {name: await r.runtime.store.count() for name, r in p.running.items()}


async def rows_containing(p: Platform, service: str, needle: str) -> list[str]:
    """Every table of ``service``'s database (the events' bytes too) with ``needle`` in it."""
    found = []
    async with p.running[service].runtime.store.engine.connect() as conn:
        tables = (
            await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        ).scalars()
        for table in list(tables):
            hit = await conn.scalar(
                text(
                    f'SELECT count(*) FROM "{table}" t WHERE position(:n in t::text) > 0'
                    f" OR position(convert_to(:n, 'UTF8') in convert_to(t::text, 'UTF8')) > 0"
                ),
                {"n": needle},
            )
            if hit:
                found.append(table)
        events = await conn.scalar(
            text(
                "SELECT count(*) FROM events WHERE position(convert_to(:n, 'UTF8') in envelope) > 0"
            ),
            {"n": needle},
        )
        if events:
            found.append("events.envelope")
    return found


# -- maker-checker ---------------------------------------------------------------------------


async def test_a_rule_set_is_proposed_by_an_operator_and_activated_only_by_another_approver(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    before = await risk.auditor.ListRules(risk_pb2.ListRiskRulesRequest())
    rules = [velocity(f"device-claims-{rng.randrange(10**6)}", "device", 1)]
    proposed = await risk.operator.ProposeRules(
        risk_pb2.ProposeRulesRequest(rule_set=rule_set(rules), reason="hoarding by one phone")
    )
    assert (proposed.status, proposed.kind, proposed.proposed_by) == (
        "PROPOSED",
        "rules",
        "risk-li",
    )
    listed = await risk.auditor.ListRules(risk_pb2.ListRiskRulesRequest())
    assert listed.version == before.version  # nothing changed yet
    assert proposed.change_id in {c.change_id for c in listed.pending}

    # The proposer, even holding an approver certificate, cannot approve their own change.
    approve = risk_pb2.ApproveRiskChangeRequest(change_id=proposed.change_id, reason="ok")
    code, reason, field, _ = await refusal(risk.same_person.ApproveChange(approve))
    assert (code, reason, field) == (DENIED, "MAKER_CHECKER", "change_id")
    # An operator may not approve at all; a platform may not even read the rules.
    code, reason, _, _ = await refusal(risk.operator.ApproveChange(approve))
    assert (code, reason) == (DENIED, "ROLE_NOT_ALLOWED")
    code, reason, _, _ = await refusal(risk.platform.ListRules(risk_pb2.ListRiskRulesRequest()))
    assert (code, reason) == (DENIED, "ROLE_NOT_ALLOWED")
    assert (await risk.auditor.ListRules(risk_pb2.ListRiskRulesRequest())).version == before.version

    approved = await risk.approver.ApproveChange(approve)
    assert (approved.status, approved.approved_by) == ("APPROVED", "risk-wang")
    assert approved.activated_version == before.version + 1
    again = await risk.approver.ApproveChange(approve)  # idempotent: no second version
    assert again.activated_version == approved.activated_version
    now = await risk.auditor.ListRules(risk_pb2.ListRiskRulesRequest())
    assert now.version == before.version + 1
    assert [r.rule_id for r in now.rule_set.rules] == [rules[0]["rule_id"]]
    assert proposed.change_id not in {c.change_id for c in now.pending}
    # The activation is an event of eligibility's, with the maker's and checker's names.
    events = await p.running["eligibility"].runtime.store.read_stream("risk-rules", now.version)
    assert [e.event_type for e in events] == ["subsidy.v1.RiskRulesActivated"]
    assert events[0].actor.id == "risk-wang"


# -- refusals of the edge -------------------------------------------------------------------


async def test_bad_rule_documents_and_callers_are_refused_and_change_nothing(
    platform: Platform, risk: Risk
) -> None:
    p = platform
    before = await event_counts(p)
    cases: list[tuple[risk_pb2.RiskRuleSet, str, str]] = [
        (
            rule_set([velocity("geo", "device", 1) | {"kind": "geofence"}]),
            "UNKNOWN_RULE_KIND",
            "rule_set.rules[0].kind",
        ),
        (
            rule_set([velocity(f"r{i}", "device", 1) for i in range(65)]),
            "RULE_SET_TOO_LARGE",
            "rule_set.rules",
        ),
        (  # a document over 16 KiB is refused before it is even parsed
            rule_set([velocity("x" * 20_000, "device", 1)]),
            "RULE_SET_TOO_LARGE",
            "rule_set",
        ),
        (
            rule_set([velocity("a", "device", 1), velocity("a", "ip", 2)]),
            "DUPLICATE_RULE_ID",
            "rule_set.rules[1].rule_id",
        ),
        (
            rule_set([velocity("cluster-ish", "device", 1) | {"max_persons": 3}]),
            "UNKNOWN_RULE_FIELD",
            "rule_set.rules[0].max_persons",
        ),
        (
            rule_set([velocity("w", "device", 1) | {"window_s": 10**9}]),
            "INVALID_RULE",
            "rule_set.rules[0].window_s",
        ),
        (rule_set([velocity("s", "phone", 1)]), "INVALID_RULE", "rule_set.rules[0].subject"),
    ]
    for doc, reason, field in cases:
        code, got, at, _ = await refusal(
            risk.operator.ProposeRules(risk_pb2.ProposeRulesRequest(rule_set=doc, reason="r"))
        )
        assert (code, got, at) == (INVALID, reason, field)
    fine = rule_set([velocity("fine", "device", 5)])
    code, got, at, _ = await refusal(
        risk.operator.ProposeRules(risk_pb2.ProposeRulesRequest(rule_set=fine))
    )
    assert (code, got, at) == (INVALID, "MISSING_FIELD", "reason")  # a change says why
    for who in (risk.approver, risk.auditor, risk.platform):
        code, got, _, _ = await refusal(
            who.ProposeRules(risk_pb2.ProposeRulesRequest(rule_set=fine, reason="r"))
        )
        assert (code, got) == (DENIED, "ROLE_NOT_ALLOWED")
    code, got, _, _ = await refusal(
        risk.approver.LiftBlock(risk_pb2.LiftBlockRequest(decision_id="rd-x", reason="r"))
    )
    assert (code, got) == (DENIED, "ROLE_NOT_ALLOWED")
    # List changes: kinds, values, expiries.
    bad_lists: list[tuple[risk_pb2.ProposeListChangeRequest, grpc.StatusCode, str, str]] = [
        (list_change("add", "block", "bucket", "x"), INVALID, "INVALID_CHOICE", "kind"),
        (list_change("add", "block", "ip", "10.0.0.1"), INVALID, "INVALID_CHOICE", "kind"),
        (list_change("add", "grey", "device", "dev-123456"), INVALID, "INVALID_CHOICE", "list"),
        (list_change("add", "block", "device", "no spaces!"), INVALID, "DEVICE_ID_FORMAT", "value"),
        (
            list_change("add", "block", "device", "dev-123456", hours=-1),
            INVALID,
            "INVALID_EXPIRY",
            "expires_at",
        ),
        (
            list_change("add", "block", "device", "dev-123456", hours=24 * 400),
            INVALID,
            "INVALID_EXPIRY",
            "expires_at",
        ),
        (
            risk_pb2.ProposeListChangeRequest(change="remove", entry_id="rle-nope", reason="r"),
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_LIST_ENTRY",
            "entry_id",
        ),
    ]
    for request, status, reason, field in bad_lists:
        code, got, at, message = await refusal(risk.operator.ProposeListChange(request))
        assert (code, got, at) == (status, reason, field), request
        assert not request.value or request.value not in message  # never the value
    code, got, at, _ = await refusal(
        risk.approver.ApproveChange(risk_pb2.ApproveRiskChangeRequest(change_id="rc-nope"))
    )
    assert (code, got, at) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_RISK_CHANGE", "change_id")
    assert await event_counts(p) == before


# -- enforcement within a second, on every replica -------------------------------------------


async def test_a_block_approved_once_is_enforced_by_claims_and_reservations_within_a_second(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    banned = device(rng)
    _, first = await p.person(rng)
    _, second = await p.person(rng)
    q = await claim(p, first, circumstances(device_id=banned))  # before the block: allowed
    sku = await p.product(rng, FRIDGE, 1, FRIDGE_PRICE)
    pool = await p.pool(rng, 10_000_000)
    copies = {s: active_copy(p, s) for s in ("eligibility", "ledger")}
    # Two more replicas, one per service, polling their databases as a second pod would.
    replicas = {
        s: ActiveRisk(
            p.running[s].runtime.store.engine, copies[s].tables, lambda: datetime.now(UTC)
        )
        for s in copies
    }
    stop = asyncio.Event()
    loops = [asyncio.create_task(r.run(stop)) for r in replicas.values()]
    try:
        await eventually(lambda: _loaded(replicas))
        version = await risk.add("device", banned)  # approved through eligibility's API
        approved_at = time.monotonic()
        took = {}
        for name, copy in (*copies.items(), *((f"{s} replica", r) for s, r in replicas.items())):
            await within(1.0, lists_at(copy, version))
            took[name] = time.monotonic() - approved_at
        assert max(took.values()) < 1.0, took
    finally:
        stop.set()
        await asyncio.gather(*loops)
    print(f"block in force after (s): { {k: round(v, 3) for k, v in took.items()} }")

    # A claim from the banned device is refused; the field is named, the value never.
    code, reason, field, message = await refusal(claim(p, second, circumstances(device_id=banned)))
    assert (code, reason, field) == (PRECONDITION, "RISK_BLOCKED", "circumstances.device_id")
    assert banned not in message and "block-list:device" in message
    # So is a reservation from it, before anything is locked.
    order = f"o-{rng.randrange(10**12)}"
    code, reason, field, message = await refusal(
        p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id="jd",
                pool_id=pool,
                consumer_id=first,
                qualification_id=q.qualification_id,
                sku=sku,
                unit_price_fen=FRIDGE_PRICE,
                circumstances=circumstances(device_id=banned),
            )
        )
    )
    assert (code, reason, field) == (PRECONDITION, "RISK_BLOCKED", "circumstances.device_id")
    assert banned not in message
    held = await p.eligibility.GetQualification(
        eligibility_pb2.GetQualificationRequest(qualification_id=q.qualification_id)
    )
    assert held.status == "AVAILABLE"  # the refused reservation locked nothing
    budget = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool))
    assert budget.reserved_fen == 0
    # The same consumer from another device goes through.
    res = await p.ledger.ReserveSubsidy(
        ledger_pb2.ReserveSubsidyRequest(
            order_id=f"o-{rng.randrange(10**12)}",
            platform_id="jd",
            pool_id=pool,
            consumer_id=first,
            qualification_id=q.qualification_id,
            sku=sku,
            unit_price_fen=FRIDGE_PRICE,
            circumstances=circumstances(device_id=device(rng)),
        )
    )
    assert res.status == "PENDING"

    # Both blocks are decisions an operator reviews, with the rule, versions and masked input.
    async def both_listed() -> list[risk_pb2.RiskDecision]:
        listed = await risk.auditor.ListDecisions(
            risk_pb2.ListRiskDecisionsRequest(outcome="block")
        )
        mine = [d for d in listed.decisions if d.consumer_id in (first, second)]
        assert {d.service for d in mine} == {"eligibility", "ledger"}
        return mine

    for d in await eventually(both_listed):
        assert (d.rule_id, d.lists_version, d.status) == ("block-list:device", version, "OPEN")
        assert d.inputs["circumstances.device_id"] == f"{banned[:2]}***{banned[-2:]}"
        assert d.reference in (order, "") or d.reference.startswith("q-")
    for service in ("eligibility", "ledger"):
        assert await rows_containing(p, service, banned) == [], service


def lists_at(copy: ActiveRisk, version: int) -> Callable[[], bool]:
    return lambda: copy.lists.version >= version


async def _loaded(replicas: dict[str, ActiveRisk]) -> None:
    assert all(r._versions != (-1, -1) for r in replicas.values())


# -- velocity, exactly, under concurrency ----------------------------------------------------


async def test_device_velocity_admits_exactly_max_count_concurrent_claims(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    rule_id = f"device-claims-{rng.randrange(10**6)}"
    version = await risk.activate([velocity(rule_id, "device", 2)])
    await within(1.0, lambda: active_copy(p, "eligibility").rules.version >= version)
    shared = device(rng)
    people = [(await p.person(rng))[1] for _ in range(6)]
    outcomes = await asyncio.gather(
        *(claim(p, c, circumstances(device_id=shared)) for c in people), return_exceptions=True
    )
    issued = [o for o in outcomes if isinstance(o, eligibility_pb2.Qualification)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert (len(issued), len(refused)) == (2, 4), outcomes
    for err in refused:
        assert status_of(err) == (PRECONDITION, "RISK_BLOCKED", "circumstances.device_id")
    # The refused consumers hold nothing; their blocks name the rule and its version.
    for c in people:
        if c not in {q.consumer_id for q in issued}:
            listed = await risk.auditor.ListDecisions(risk_pb2.ListRiskDecisionsRequest())
            d = next(d for d in listed.decisions if d.consumer_id == c)
            assert (d.rule_id, d.rule_set_version, d.inputs["count"]) == (rule_id, version, "2")
    # Another device is not counted with it.
    other = (await p.person(rng))[1]
    assert (await claim(p, other, circumstances(device_id=device(rng)))).status == "AVAILABLE"


async def test_a_flag_lets_the_claim_through_and_is_recorded_with_masked_inputs(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    rule_id = f"address-cluster-{rng.randrange(10**6)}"
    version = await risk.activate(
        [
            {
                "rule_id": rule_id,
                "kind": "address_cluster",
                "action": "claim",
                "window_s": 86400,
                "max_persons": 1,
                "verdict": "flag",
            }
        ]
    )
    await within(1.0, lambda: active_copy(p, "eligibility").rules.version >= version)
    street = f"坪山区龙田街道{rng.randrange(10**6)}号"
    first, second = (await p.person(rng))[1], (await p.person(rng))[1]
    await claim(p, first, circumstances(delivery_address=street))
    again = await claim(p, first, circumstances(delivery_address=street), category="tv")
    assert again.status == "AVAILABLE"  # the same person twice is still one person
    flagged = await claim(p, second, circumstances(delivery_address=f" {street} "))
    assert flagged.status == "AVAILABLE"  # a flag does not refuse
    listed = await risk.auditor.ListDecisions(risk_pb2.ListRiskDecisionsRequest(outcome="flag"))
    mine = [d for d in listed.decisions if d.consumer_id in (first, second)]
    assert [(d.consumer_id, d.rule_id, d.rule_set_version) for d in mine] == [
        (second, rule_id, version)
    ]
    assert mine[0].reference == flagged.qualification_id
    assert mine[0].inputs["other_persons"] == "1"
    assert street not in mine[0].inputs["circumstances.delivery_address"]
    assert await rows_containing(p, "eligibility", street) == []
    # A flag cannot be lifted: there is nothing to lift.
    code, reason, _, _ = await refusal(
        risk.operator.LiftBlock(
            risk_pb2.LiftBlockRequest(decision_id=mine[0].decision_id, reason="fine")
        )
    )
    assert (code, reason) == (PRECONDITION, "NOT_A_BLOCK")


# -- a ledger block, reviewed and lifted -----------------------------------------------------


async def test_a_reservation_velocity_block_is_reviewed_and_lifted_by_an_operator(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    rule_id = f"card-reserves-{rng.randrange(10**6)}"
    version = await risk.activate([velocity(rule_id, "card", 1, action="reserve")])
    await within(1.0, lambda: active_copy(p, "ledger").rules.version >= version)
    card = "6222" + "".join(str(rng.randrange(10)) for _ in range(12))
    sku = await p.product(rng, FRIDGE, 1, FRIDGE_PRICE)
    pool = await p.pool(rng, 10_000_000)
    people = [(await p.person(rng))[1] for _ in range(2)]
    quals = [(await claim(p, c, circumstances())).qualification_id for c in people]

    def reserve(i: int, order: str) -> Awaitable[ledger_pb2.Reservation]:
        return p.ledger.ReserveSubsidy(
            ledger_pb2.ReserveSubsidyRequest(
                order_id=order,
                platform_id="jd",
                pool_id=pool,
                consumer_id=people[i],
                qualification_id=quals[i],
                sku=sku,
                unit_price_fen=FRIDGE_PRICE,
                circumstances=circumstances(bank_card=card),
            )
        )

    assert (await reserve(0, f"o-{rng.randrange(10**12)}")).status == "PENDING"
    code, reason, field, message = await refusal(reserve(1, f"o-{rng.randrange(10**12)}"))
    assert (code, reason, field) == (PRECONDITION, "RISK_BLOCKED", "circumstances.bank_card")
    assert card not in message and card[-4:] not in message

    async def listed() -> risk_pb2.RiskDecision:
        found = await risk.operator.ListDecisions(risk_pb2.ListRiskDecisionsRequest(status="OPEN"))
        mine = [d for d in found.decisions if d.consumer_id == people[1]]
        assert len(mine) == 1
        return mine[0]

    decision = await eventually(listed)
    assert (decision.service, decision.action, decision.rule_id) == ("ledger", "reserve", rule_id)
    assert decision.inputs["circumstances.bank_card"] == f"****{card[-4:]}"

    # Only an operator lifts, with a reason; the lift is an event and exempts the card.
    code, reason, field, _ = await refusal(
        risk.operator.LiftBlock(risk_pb2.LiftBlockRequest(decision_id=decision.decision_id))
    )
    assert (code, reason, field) == (INVALID, "MISSING_FIELD", "reason")
    lifted = await risk.operator.LiftBlock(
        risk_pb2.LiftBlockRequest(
            decision_id=decision.decision_id, reason="family card, checked by phone"
        )
    )
    assert (lifted.status, lifted.lifted_by) == ("LIFTED", "risk-li")
    stream = await p.running["eligibility"].runtime.store.read_stream(
        f"risk-decision/{decision.decision_id}"
    )
    assert [e.event_type for e in stream] == ["subsidy.v1.RiskBlockLifted"]
    allowed = await risk.auditor.ListLists(risk_pb2.ListRiskListsRequest(list="allow", kind="card"))
    exemption = next(e for e in allowed.entries if e.subject_masked == f"****{card[-4:]}")
    assert exemption.expires_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(minutes=55)
    await within(1.0, lambda: active_copy(p, "ledger").lists.version >= allowed.version)
    # A fresh order with the same card now goes through (the refused order stays refused).
    assert (await reserve(1, f"o-{rng.randrange(10**12)}")).status == "PENDING"
    for service in ("eligibility", "ledger"):
        assert await rows_containing(p, service, card) == [], service


async def test_removing_a_block_entry_is_maker_checker_and_lets_the_subject_through(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    version = await risk.add("person", consumer)
    await within(1.0, lambda: active_copy(p, "eligibility").lists.version >= version)
    code, reason, field, _ = await refusal(claim(p, consumer, circumstances()))
    assert (code, reason, field) == (PRECONDITION, "RISK_BLOCKED", "consumer_id")
    entries = await risk.auditor.ListLists(
        risk_pb2.ListRiskListsRequest(list="block", kind="person")
    )
    entry = next(e for e in entries.entries if e.subject_index == consumer)
    removal = await risk.operator.ProposeListChange(
        risk_pb2.ProposeListChangeRequest(change="remove", entry_id=entry.entry_id, reason="error")
    )
    code, reason, _, _ = await refusal(
        risk.same_person.ApproveChange(
            risk_pb2.ApproveRiskChangeRequest(change_id=removal.change_id)
        )
    )
    assert reason == "MAKER_CHECKER"
    await asyncio.sleep(0.3)  # nothing approved: still blocked
    assert (await refusal(claim(p, consumer, circumstances())))[1] == "RISK_BLOCKED"
    done = await risk.approver.ApproveChange(
        risk_pb2.ApproveRiskChangeRequest(change_id=removal.change_id)
    )
    await within(1.0, lambda: active_copy(p, "eligibility").lists.version >= done.activated_version)
    assert (await claim(p, consumer, circumstances())).status == "AVAILABLE"


# -- replay ----------------------------------------------------------------------------------


async def test_the_risk_read_models_rebuild_from_the_events_to_the_same_rows(
    platform: Platform, risk: Risk, rng: random.Random
) -> None:
    p = platform
    _, consumer = await p.person(rng)
    version = await risk.add("person", consumer)
    await within(1.0, lambda: active_copy(p, "eligibility").lists.version >= version)
    assert (await refusal(claim(p, consumer, circumstances())))[1] == "RISK_BLOCKED"
    store = p.running["eligibility"].runtime.store
    tables = (
        risk_projections.risk_changes,
        risk_projections.tables.rule_sets,
        risk_projections.tables.list_entries,
        risk_projections.tables.state,
        risk_projections.risk_decisions,
    )

    async def rows() -> dict[str, list[tuple[Any, ...]]]:
        await p.quiesce()
        async with store.engine.connect() as conn:
            return {
                t.name: sorted(tuple(r) for r in await conn.execute(t.select())) for t in tables
            }

    before = await rows()
    assert before["risk_decisions"] and before["risk_list_entries"] and before["risk_changes"]
    assert await risk_projections.rebuild(store) > 0
    assert await rows() == before
