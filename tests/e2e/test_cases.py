"""Supervision cases on the real stack: a complaint filed through the platform's API becomes a
case, its outcome restores a qualification through eligibility (whose event names the case and
is linked back), deadlines raise alerts once at an injected instant, risk decisions and too many
overrides by one person open cases, and every refusal changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, text

from services.audit.cases import Cases, case_orders, cases
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.identity import Caller, Role
from subsidy.v1 import (
    cases_pb2,
    cases_pb2_grpc,
    eligibility_pb2,
    eligibility_pb2_grpc,
    events_pb2,
    risk_pb2,
)
from tests.e2e import test_risk
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, eventually, status_of
from tests.e2e.test_saga import reserve_request, setup
from tests.support.callers import CallerRouter

# A complaint as a consumer writes it: it names them (the phone number stands for personal data).
PHONE = "13812345678"
TEXT = f"The merchant never delivered; please call me on {PHONE}. 商家未发货。"


@dataclass
class Callers:
    jd: cases_pb2_grpc.CaseServiceAsyncStub
    taobao: cases_pb2_grpc.CaseServiceAsyncStub
    operator: cases_pb2_grpc.CaseServiceAsyncStub
    checker: cases_pb2_grpc.CaseServiceAsyncStub
    routers: list[CallerRouter]


@pytest.fixture
async def callers(platform: Platform) -> AsyncIterator[Callers]:
    router = CallerRouter(f"127.0.0.1:{platform.running['audit'].port}", platform.infra.identities)
    who = {
        "jd": Caller(Role.PLATFORM, "jd"),
        "taobao": Caller(Role.PLATFORM, "taobao"),
        "operator": Caller(Role.OPERATOR, "case-li"),
        "checker": Caller(Role.APPROVER, "case-wang"),
    }
    routers = {name: router.as_caller(c) for name, c in who.items()}
    yield Callers(
        **{n: cases_pb2_grpc.CaseServiceStub(r) for n, r in routers.items()},
        routers=[router, *routers.values()],
    )
    for r in routers.values():
        await r.close()
    await router.close()


def cases_of(p: Platform) -> Cases:
    found: Cases = p.running["audit"].wiring.registrations[1][1].cases
    return found


@pytest.fixture
def clock(platform: Platform) -> Iterator[Cases]:
    c = cases_of(platform)
    real = c.clock
    yield c
    c.clock = real


async def case_events(p: Platform, case_id: str) -> list[tuple[str, bytes]]:
    """The case stream's events in the audit service's own store: (type, envelope bytes)."""
    async with p.running["audit"].runtime.store.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_type, envelope FROM events WHERE stream_id = :s "
                "ORDER BY stream_version"
            ),
            {"s": f"case/{case_id}"},
        )
        return [(str(t), bytes(e)) for t, e in rows]


async def case_count(p: Platform) -> int:
    async with p.running["audit"].runtime.store.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(cases)) or 0)


async def order_of(p: Platform, rng: random.Random) -> str:
    """A real order of platform jd (reserved), once the audit service knows whose it is."""
    consumer, sku, pool, qid = await setup(p, rng)
    order = f"o-case-{rng.randrange(10**12)}"
    await p.ledger.ReserveSubsidy(reserve_request(order, consumer, sku, pool, qid))

    async def known() -> None:
        async with p.running["audit"].runtime.store.engine.connect() as conn:
            found = await conn.scalar(
                select(case_orders.c.platform_id).where(case_orders.c.order_id == order)
            )
        assert found == "jd"

    await eventually(known)
    return order


async def forfeited_qualification(p: Platform, rng: random.Random) -> str:
    """A qualification an earlier case forfeited (claimed with a borrowed identity, it said)."""
    _, consumer = await p.person(rng)
    qid = await p.claim(consumer, "phone")
    q = await p.eligibility.ForfeitQualification(
        eligibility_pb2.CaseQualificationRequest(
            qualification_id=qid, case_id=f"case-earlier-{qid}", reason="borrowed identity"
        )
    )
    assert q.status == "FORFEITED"
    return qid


async def test_a_complaint_becomes_a_case_whose_outcome_restores_a_qualification(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    p = platform
    qid = await forfeited_qualification(p, rng)
    order = await order_of(p, rng)

    # The platform files the complaint for its consumer: a case with the policy's deadlines.
    filed = await callers.jd.FileComplaint(
        cases_pb2.FileComplaintRequest(order_id=order, text=TEXT, complainant="CONSUMER")
    )
    assert (filed.kind, filed.status, filed.platform_id, filed.order_id) == (
        "COMPLAINT",
        "OPEN",
        "jd",
        order,
    )
    opened = filed.opened_at.ToDatetime(tzinfo=UTC)
    assert filed.first_response_due.ToDatetime(tzinfo=UTC) == opened + timedelta(hours=24)
    assert filed.resolution_due.ToDatetime(tzinfo=UTC) == opened + timedelta(days=7)
    assert filed.deadline == filed.first_response_due
    assert filed.text_length == len(TEXT) and filed.text == ""
    case_id = filed.case_id

    # The text is in no event as written: only its ciphertext, digest and length.
    [(kind, envelope)] = await case_events(p, case_id)
    assert kind == "subsidy.v1.CaseOpened"
    assert PHONE.encode() not in envelope and "商家".encode() not in envelope
    # The operator reads it (decrypted for them only).
    revealed = await callers.operator.GetCase(
        cases_pb2.GetCaseRequest(case_id=case_id, reveal_text=True)
    )
    assert revealed.text == TEXT
    # Reading personal data is on record: who read it, and when.
    kind, envelope = (await case_events(p, case_id))[-1]
    assert kind == "subsidy.v1.CaseTextRevealed"
    assert events_pb2.EventEnvelope.FromString(envelope).actor.id == "case-li"

    # The platform follows its own complaint; another platform cannot see it at all.
    assert (await callers.jd.GetCase(cases_pb2.GetCaseRequest(case_id=case_id))).status == "OPEN"
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await callers.taobao.GetCase(cases_pb2.GetCaseRequest(case_id=case_id))
    assert status_of(other.value) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_CASE", "case_id")
    with pytest.raises(grpc.aio.AioRpcError) as reveal:
        await callers.jd.GetCase(cases_pb2.GetCaseRequest(case_id=case_id, reveal_text=True))
    assert status_of(reveal.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "REVEAL_NOT_ALLOWED")
    with pytest.raises(grpc.aio.AioRpcError) as listing:  # the list is for people
        await callers.jd.ListCases(cases_pb2.ListCasesRequest())
    assert listing.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The operator answers, then resolves: the outcome is recorded, eligibility carries it out.
    assigned = await callers.operator.AssignCase(
        cases_pb2.AssignCaseRequest(case_id=case_id, assignee="case-li", reason="mine")
    )
    assert assigned.assignee == "case-li" and assigned.deadline == assigned.resolution_due
    resolved = await callers.operator.ResolveCase(
        cases_pb2.ResolveCaseRequest(
            case_id=case_id,
            outcome="RESTORE_QUALIFICATION",
            qualification_id=qid,
            reason="the consumer proved it was them",
        )
    )
    assert (resolved.status, resolved.outcome, resolved.resolved_by) == (
        "RESOLVED",
        "RESTORE_QUALIFICATION",
        "case-li",
    )
    restored = await p.eligibility.RestoreQualification(
        eligibility_pb2.CaseQualificationRequest(
            qualification_id=qid, case_id=case_id, reason="the consumer proved it was them"
        )
    )
    assert (restored.status, restored.order_id) == ("AVAILABLE", "")
    # The owning service's event names the case, and the case links to it.
    async with p.running["eligibility"].runtime.store.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT event_id, envelope FROM events WHERE event_type = :t"),
                {"t": "subsidy.v1.QualificationRestored"},
            )
        ).all()
    linked = []
    for event_id, data in rows:
        env = events_pb2.EventEnvelope.FromString(bytes(data))
        payload = events_pb2.QualificationRestored.FromString(env.payload)
        if payload.case_id == case_id:
            assert payload.qualification_id == qid and env.actor.id == "ops"
            linked.append(str(event_id))
    assert len(linked) == 1

    async def applied() -> cases_pb2.Case:
        got = await callers.jd.GetCase(cases_pb2.GetCaseRequest(case_id=case_id))
        assert got.applied_event_id == linked[0]
        return got

    followed = await eventually(applied)
    assert (followed.status, followed.outcome) == ("RESOLVED", "RESTORE_QUALIFICATION")
    assert followed.assignee == followed.resolved_by == ""  # no staff names to a platform
    # Carrying it out again changes nothing (eligibility records nothing the second time).
    again = await p.eligibility.RestoreQualification(
        eligibility_pb2.CaseQualificationRequest(qualification_id=qid, case_id=case_id, reason="x")
    )
    assert again.status == "AVAILABLE"

    # Refusals change nothing: resolving twice, an unknown case, an oversized complaint.
    before = await case_events(p, case_id)
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await callers.operator.ResolveCase(
            cases_pb2.ResolveCaseRequest(case_id=case_id, outcome="NO_ACTION", reason="again")
        )
    assert status_of(twice.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CASE_ALREADY_RESOLVED",
        "case_id",
    )
    assert await case_events(p, case_id) == before
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await callers.operator.ResolveCase(
            cases_pb2.ResolveCaseRequest(case_id="case-nope", outcome="NO_ACTION", reason="x")
        )
    assert status_of(unknown.value) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_CASE", "case_id")
    assert await case_events(p, "case-nope") == []
    count = await case_count(p)
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await callers.jd.FileComplaint(
            cases_pb2.FileComplaintRequest(order_id=order, text="x" * 2001)
        )
    assert status_of(big.value) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG", "text")
    with pytest.raises(grpc.aio.AioRpcError) as naming:  # a platform files only as itself
        await callers.jd.FileComplaint(
            cases_pb2.FileComplaintRequest(order_id=order, text="hi", platform_id="taobao")
        )
    assert status_of(naming.value)[1] == "NOT_YOUR_PLATFORM"
    for stub, about in ((callers.taobao, order), (callers.jd, "o-never-reserved")):
        with pytest.raises(grpc.aio.AioRpcError) as unknown_order:  # another's, or no order
            await stub.FileComplaint(cases_pb2.FileComplaintRequest(order_id=about, text="hi"))
        assert status_of(unknown_order.value) == (
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_ORDER",
            "order_id",
        )
    assert await case_count(p) == count
    # Personal data stays out of every event of the audit service's store.
    async with p.running["audit"].runtime.store.engine.connect() as conn:
        leaked = await conn.scalar(
            text("SELECT count(*) FROM events WHERE position(:phone IN envelope) > 0"),
            {"phone": PHONE.encode()},
        )
    assert leaked == 0


async def test_a_complaint_filed_again_under_its_id_answers_the_same_case(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    """A platform that lost the answer files again with the same complaint id: the same case,
    one CaseOpened; the id reused for another complaint is refused and changes nothing."""
    p = platform
    order = await order_of(p, rng)
    complaint_id = f"cmp-{rng.randrange(10**12)}"
    request = cases_pb2.FileComplaintRequest(
        order_id=order, text=TEXT, complainant="CONSUMER", complaint_id=complaint_id
    )
    first = await callers.jd.FileComplaint(request)
    count = await case_count(p)
    again = await callers.jd.FileComplaint(request)
    assert again.case_id == first.case_id
    assert again.opened_at == first.opened_at
    assert [kind for kind, _ in await case_events(p, first.case_id)] == ["subsidy.v1.CaseOpened"]
    assert await case_count(p) == count

    other = cases_pb2.FileComplaintRequest(
        order_id=order, text="a different complaint", complaint_id=complaint_id
    )
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await callers.jd.FileComplaint(other)
    assert status_of(reused.value) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "COMPLAINT_ID_REUSED",
        "complaint_id",
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await callers.jd.FileComplaint(
            cases_pb2.FileComplaintRequest(order_id=order, text="hi", complaint_id="x\n")
        )
    assert status_of(bad.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_IDENTIFIER",
        "complaint_id",
    )
    assert await case_count(p) == count
    assert [kind for kind, _ in await case_events(p, first.case_id)] == ["subsidy.v1.CaseOpened"]
    # The text the retry brought was not stored again; the case's own still opens.
    shown = await callers.operator.GetCase(
        cases_pb2.GetCaseRequest(case_id=first.case_id, reveal_text=True)
    )
    assert shown.text == TEXT


async def test_a_money_outcome_needs_a_second_person(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    order = await order_of(platform, rng)
    case = await callers.operator.FileComplaint(
        cases_pb2.FileComplaintRequest(order_id=order, text="fake sale", platform_id="jd")
    )
    proposed = await callers.operator.ResolveCase(
        cases_pb2.ResolveCaseRequest(
            case_id=case.case_id,
            outcome="CLAWBACK",
            order_id=order,
            amount_fen=50_000,
            reason="no goods delivered",
        )
    )
    assert (proposed.status, proposed.proposed_by) == ("AWAITING_APPROVAL", "case-li")
    same = CallerRouter(
        f"127.0.0.1:{platform.running['audit'].port}", platform.infra.identities
    ).as_caller(Caller(Role.APPROVER, "case-li"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cases_pb2_grpc.CaseServiceStub(same).ApproveCaseOutcome(
                cases_pb2.ApproveCaseOutcomeRequest(case_id=case.case_id, reason="me")
            )
        assert status_of(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "MAKER_CHECKER")
    finally:
        await same.close()
    approved = await callers.checker.ApproveCaseOutcome(
        cases_pb2.ApproveCaseOutcomeRequest(case_id=case.case_id, reason="checked the waybill")
    )
    assert (approved.status, approved.outcome, approved.amount_fen, approved.resolved_by) == (
        "RESOLVED",
        "CLAWBACK",
        50_000,
        "case-wang",
    )


async def test_overdue_deadlines_raise_one_alert_each_at_an_injected_instant(
    platform: Platform, callers: Callers, clock: Cases, rng: random.Random
) -> None:
    p = platform
    case = await callers.jd.FileComplaint(
        cases_pb2.FileComplaintRequest(order_id=await order_of(p, rng), text="late")
    )
    first = case.first_response_due.ToDatetime(tzinfo=UTC)
    resolution = case.resolution_due.ToDatetime(tzinfo=UTC)

    def alerts(events: list[tuple[str, bytes]]) -> list[str]:
        found = []
        for kind, data in events:
            if kind == "subsidy.v1.CaseOverdue":
                env = events_pb2.EventEnvelope.FromString(data)
                found.append(events_pb2.CaseOverdue.FromString(env.payload).deadline)
        return found

    clock.clock = lambda: first - timedelta(seconds=1)
    await clock.raise_overdue()
    assert alerts(await case_events(p, case.case_id)) == []
    clock.clock = lambda: first
    await clock.raise_overdue()
    await clock.raise_overdue()  # a second sweep raises nothing more
    assert alerts(await case_events(p, case.case_id)) == ["FIRST_RESPONSE"]
    clock.clock = lambda: resolution + timedelta(minutes=1)
    await clock.raise_overdue()
    await clock.raise_overdue()
    assert alerts(await case_events(p, case.case_id)) == ["FIRST_RESPONSE", "RESOLUTION"]
    got = await callers.jd.GetCase(cases_pb2.GetCaseRequest(case_id=case.case_id))
    assert list(got.overdue) == ["FIRST_RESPONSE", "RESOLUTION"]


async def test_a_risk_block_opens_one_case_per_decision(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    p = platform
    decision = f"d-{rng.randrange(10**12)}"
    block = events_pb2.RiskDecisionRecorded(
        decision_id=decision, action="claim", outcome="block", rule_id="device-velocity"
    )
    env = new_envelope(
        "eligibility", f"risk-decision/{decision}", block, Context(service_actor("eligibility"))
    )
    c = cases_of(p)
    for _ in range(2):  # delivered twice (a ledger decision reaches audit twice): one case
        async with p.running["audit"].runtime.store.transaction() as tx:
            await c.on_event(tx, env)
    got = await callers.operator.GetCase(cases_pb2.GetCaseRequest(case_id=f"risk-{decision}"))
    assert (got.kind, got.priority, got.subject, got.status) == (
        "RISK_ALERT",
        "HIGH",
        decision,
        "OPEN",
    )
    assert got.summary == "claim block by rule device-velocity"
    assert len(await case_events(p, f"risk-{decision}")) == 1


async def test_many_overrides_by_one_operator_open_a_case_and_every_action_is_listed(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    name = f"ovr-{rng.randrange(10**9)}"
    operator = CallerRouter(
        f"127.0.0.1:{p.running['eligibility'].port}", p.infra.identities
    ).as_caller(Caller(Role.OPERATOR, name))
    stub = eligibility_pb2_grpc.EligibilityServiceStub(operator)
    _, consumer = await p.person(rng)
    qid = await p.claim(consumer, "phone")
    try:
        # The policy's default: 20 overrides within 24 h open a case about that person.
        for i in range(10):
            for call in (stub.ForfeitQualification, stub.RestoreQualification):
                await call(
                    eligibility_pb2.CaseQualificationRequest(
                        qualification_id=qid, case_id=f"case-x{i}", reason=f"round {i}"
                    )
                )
    finally:
        await operator.close()
    auditor = identity_dir(p.infra.identities(Caller(Role.AUDITOR, "sup-zhao")), tmp_path / "a")
    at = ("--audit", f"127.0.0.1:{p.running['audit'].port}")

    async def listed() -> list[dict[str, Any]]:
        rows = await cli_lines(
            "cases", "operator-actions", "--operator", name, "--json", *at, identity=auditor
        )
        assert len(rows) == 20
        return rows

    rows = await eventually(listed)
    assert {r["event_type"] for r in rows} == {
        "subsidy.v1.QualificationForfeited",
        "subsidy.v1.QualificationRestored",
    }
    assert rows[0]["reason"] == "round 0" and rows[0]["service"] == "eligibility"
    async with p.running["audit"].runtime.store.engine.connect() as conn:
        opened = (
            await conn.execute(
                select(cases.c.case_id, cases.c.summary).where(
                    cases.c.kind == "OPERATOR_ACTIVITY", cases.c.subject == name
                )
            )
        ).all()
    assert len(opened) == 1, opened  # once, at the limit
    assert opened[0].summary.startswith(f"20 overrides by {name}")


async def cli_lines(*args: str, identity: Path) -> list[dict[str, Any]]:
    """Run subsidyctl and parse its stdout as one JSON object per line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBSIDY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subsidyctl",
        *args,
        "--identity",
        str(identity),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def test_cases_from_the_command_line(
    platform: Platform, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    qid = await forfeited_qualification(p, rng)
    at = ("--audit", f"127.0.0.1:{p.running['audit'].port}")
    elig = ("--eligibility", f"127.0.0.1:{p.running['eligibility'].port}")
    platform_id, operator = (
        identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (Caller(Role.PLATFORM, "jd"), Caller(Role.OPERATOR, "cli-chen"))
    )
    order = await order_of(p, rng)
    filing = ("complaint", "file", "--order", order, "--text", TEXT, "--complaint-id", "cli-1")
    code, filed, err = await subsidyctl(*filing, *at, identity=platform_id)
    assert code == 0, err
    case_id = filed["case_id"]
    assert (filed["type"], filed["status"], filed["order_id"]) == ("COMPLAINT", "OPEN", order)
    code, again, err = await subsidyctl(*filing, *at, identity=platform_id)  # a retry
    assert code == 0 and again["case_id"] == case_id, err

    listed = await cli_lines("cases", "list", "--json", *at, identity=operator)
    mine = [row for row in listed if row["case_id"] == case_id]
    assert len(mine) == 1
    assert {"case_id", "type", "status", "deadline"} <= set(mine[0])
    assert datetime.fromisoformat(mine[0]["deadline"]) == datetime.fromisoformat(filed["deadline"])

    code, assigned, err = await subsidyctl(
        "cases", "assign", case_id, "--to", "cli-chen", *at, identity=operator
    )
    assert code == 0 and assigned["assignee"] == "cli-chen", err
    code, _, err = await subsidyctl(
        "cases", "note", case_id, "--text", "called the consumer back", *at, identity=operator
    )
    assert code == 0, err
    code, shown, err = await subsidyctl(
        "cases", "show", case_id, "--reveal", *at, identity=operator
    )
    assert code == 0, err
    assert shown["text"] == TEXT and shown["notes"][0]["text"] == "called the consumer back"
    code, resolved, err = await subsidyctl(
        "cases",
        "resolve",
        case_id,
        "--outcome",
        "RESTORE_QUALIFICATION",
        "--qualification",
        qid,
        "--reason",
        "delivered nothing",
        *at,
        *elig,
        identity=operator,
    )
    assert code == 0, err
    assert resolved["status"] == "RESOLVED"
    assert resolved["qualification"] == {"qualification_id": qid, "status": "AVAILABLE"}
    code, again_applied, err = await subsidyctl(
        "cases", "apply", case_id, *at, *elig, identity=operator
    )  # carrying it out again changes nothing
    assert code == 0 and again_applied["qualification"]["status"] == "AVAILABLE", err
    code, again, err = await subsidyctl(
        "cases",
        "resolve",
        case_id,
        "--outcome",
        "NO_ACTION",
        "--reason",
        "x",
        *at,
        identity=operator,
    )
    assert (code, again) == (2, {}) and '"reason": "CASE_ALREADY_RESOLVED"' in err


async def test_the_cases_read_model_rebuilds_from_the_events_to_the_same_rows(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    from services.audit.cases import TABLES, apply_event

    p = platform
    case = await callers.jd.FileComplaint(
        cases_pb2.FileComplaintRequest(order_id=await order_of(p, rng), text="rebuild")
    )
    await callers.operator.AssignCase(
        cases_pb2.AssignCaseRequest(case_id=case.case_id, assignee="case-li")
    )
    await callers.operator.ResolveCase(
        cases_pb2.ResolveCaseRequest(case_id=case.case_id, outcome="NO_ACTION", reason="ok")
    )
    await p.quiesce()  # no consumer opens a case while the table is replaced
    store = p.running["audit"].runtime.store

    async def rows() -> list[Any]:
        async with store.engine.connect() as conn:
            return list((await conn.execute(select(cases).order_by(cases.c.case_id))).all())

    before = await rows()
    assert any(r.case_id == case.case_id and r.resolved_by == "case-li" for r in before)
    await store.rebuild(TABLES, apply_event)
    assert await rows() == before


async def test_a_detector_finding_opens_its_case_once(
    platform: Platform, callers: Callers, rng: random.Random
) -> None:
    key = f"shared_serial/serial/IMEI-{rng.randrange(10**9)}/several orders"
    c = cases_of(platform)
    first = await c.open_finding(key, "one serial on 2 orders", subject="IMEI")
    again = await c.open_finding(key, "one serial on 2 orders", subject="IMEI")
    assert first.case_id == again.case_id
    got = await callers.operator.GetCase(cases_pb2.GetCaseRequest(case_id=first.case_id))
    assert (got.kind, got.priority, got.summary) == ("DETECTION", "HIGH", "one serial on 2 orders")
    assert len(await case_events(platform, first.case_id)) == 1


@pytest.fixture
async def risk(platform: Platform) -> AsyncIterator[test_risk.Risk]:
    """RiskService stubs; the rule set in force before the test is in force again after it
    (as tests/e2e/test_risk.py's fixture)."""
    r = test_risk.Risk(platform)
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


async def test_a_real_block_opens_a_case_whose_lift_goes_through_eligibility(
    platform: Platform, risk: test_risk.Risk, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    rule_id = f"case-device-{rng.randrange(10**6)}"
    version = await risk.activate([test_risk.velocity(rule_id, "device", 1)])
    await test_risk.within(
        1.0, lambda: test_risk.active_copy(p, "eligibility").rules.version >= version
    )
    shared = test_risk.device(rng)
    first, second = (await p.person(rng))[1], (await p.person(rng))[1]
    await test_risk.claim(p, first, test_risk.circumstances(device_id=shared))
    with pytest.raises(grpc.aio.AioRpcError) as blocked:
        await test_risk.claim(p, second, test_risk.circumstances(device_id=shared))
    assert status_of(blocked.value)[1] == "RISK_BLOCKED"
    listed = await risk.auditor.ListDecisions(risk_pb2.ListRiskDecisionsRequest())
    decision = next(d for d in listed.decisions if d.consumer_id == second)
    case_id = f"risk-{decision.decision_id}"
    operator = identity_dir(p.infra.identities(Caller(Role.OPERATOR, "risk-li")), tmp_path / "o")
    at = ("--audit", f"127.0.0.1:{p.running['audit'].port}")
    elig = ("--eligibility", f"127.0.0.1:{p.running['eligibility'].port}")

    async def opened() -> dict[str, Any]:
        code, shown, err = await subsidyctl("cases", "show", case_id, *at, identity=operator)
        assert code == 0, err
        return shown

    shown = await eventually(opened, within=30)
    assert (shown["type"], shown["priority"], shown["subject"]) == (
        "RISK_ALERT",
        "HIGH",
        decision.decision_id,
    )
    assert shown["summary"] == f"claim block by rule {rule_id}"
    code, resolved, err = await subsidyctl(
        "cases",
        "resolve",
        case_id,
        "--outcome",
        "LIFT_BLOCK",
        "--reason",
        "a family's shared tablet",
        *at,
        *elig,
        identity=operator,
    )
    assert code == 0, err
    assert resolved["decision"] == {"decision_id": decision.decision_id, "status": "LIFTED"}
    lifted = await p.running["eligibility"].runtime.store.read_stream(
        f"risk-decision/{decision.decision_id}"
    )
    assert [e.event_type for e in lifted] == [
        "subsidy.v1.RiskDecisionRecorded",  # a claim's block is recorded in its stream
        "subsidy.v1.RiskBlockLifted",
    ]

    async def linked() -> None:
        got = await cases_of(p).get(case_id, None)
        assert got.case.applied_event_id == lifted[-1].event_id

    await eventually(linked)
