"""Supervisor reviews on the real stack: a supervisor (an approver) draws a reproducible random
sample of one operator's recorded actions, marks each reviewed OK or flagged (a flag opens a
case about the operator, the note sealed as its text), from gRPC and the command line; and
every refusal (one's own actions, an unknown review, a second verdict, someone else's review,
an operator drawing one) changes nothing."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from services.audit.reviews import TABLES, apply_event, review_actions, reviews
from services.kernel.identity import Caller, Role
from subsidy.v1 import cases_pb2, cases_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc
from tests.e2e.cli import identity_dir, subsidyctl
from tests.e2e.conftest import Platform, eventually, status_of
from tests.support.callers import CallerRouter

NOTE = "restored and forfeited the same qualification within a minute; ask why"


@dataclass
class People:
    operator: str
    supervisor: cases_pb2_grpc.CaseServiceAsyncStub
    other_supervisor: cases_pb2_grpc.CaseServiceAsyncStub
    as_themself: cases_pb2_grpc.CaseServiceAsyncStub  # the operator's own approver certificate
    operator_stub: cases_pb2_grpc.CaseServiceAsyncStub
    auditor: cases_pb2_grpc.CaseServiceAsyncStub
    eligibility: eligibility_pb2_grpc.EligibilityServiceAsyncStub


@pytest.fixture
async def people(platform: Platform, rng: random.Random) -> AsyncIterator[People]:
    p = platform
    name = f"rev-li-{rng.randrange(10**9)}"
    audit = CallerRouter(f"127.0.0.1:{p.running['audit'].port}", p.infra.identities)
    elig = CallerRouter(f"127.0.0.1:{p.running['eligibility'].port}", p.infra.identities)
    routers = {
        "supervisor": audit.as_caller(Caller(Role.APPROVER, f"rev-wang-{name}")),
        "other_supervisor": audit.as_caller(Caller(Role.APPROVER, f"rev-zhao-{name}")),
        "as_themself": audit.as_caller(Caller(Role.APPROVER, name)),
        "operator_stub": audit.as_caller(Caller(Role.OPERATOR, name)),
        "auditor": audit.as_caller(Caller(Role.AUDITOR, f"rev-sun-{name}")),
    }
    operator = elig.as_caller(Caller(Role.OPERATOR, name))
    try:
        yield People(
            operator=name,
            **{k: cases_pb2_grpc.CaseServiceStub(r) for k, r in routers.items()},
            eligibility=eligibility_pb2_grpc.EligibilityServiceStub(operator),
        )
    finally:
        for r in (*routers.values(), operator, audit, elig):
            await r.close()


async def actions_of(p: Platform, people: People, rng: random.Random, n: int) -> list[str]:
    """``n`` recorded actions of the operator (forfeits and restores, one case's worth: fewer
    than the policy's override limit), once the audit service lists them; their event ids in
    the order a sample draws from (occurred-at, then event id)."""
    _, consumer = await p.person(rng)
    qid = await p.claim(consumer, "phone")
    calls = (people.eligibility.ForfeitQualification, people.eligibility.RestoreQualification)
    for i in range(n):
        await calls[i % 2](
            eligibility_pb2.CaseQualificationRequest(
                qualification_id=qid, case_id=f"case-rev-{qid}", reason=f"step {i}"
            )
        )

    async def listed() -> list[str]:
        got = await people.auditor.ListOperatorActions(
            cases_pb2.ListOperatorActionsRequest(operator=people.operator)
        )
        assert len(got.actions) == n
        ordered = sorted(got.actions, key=lambda a: (a.at.ToDatetime(), a.event_id))
        return [a.event_id for a in ordered]

    return await eventually(listed)


async def refused(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return status_of(err.value)


async def test_a_supervisor_reviews_a_reproducible_sample_and_a_flag_opens_a_case(
    platform: Platform, people: People, rng: random.Random
) -> None:
    p = platform
    population = await actions_of(p, people, rng, 6)
    review = await people.supervisor.SampleOperatorActions(
        cases_pb2.SampleOperatorActionsRequest(
            size=3, operator=people.operator, seed=42, reason="monthly sample"
        )
    )
    assert (review.operator, review.seed, review.size, review.population) == (
        people.operator,
        42,
        3,
        6,
    )
    assert review.reviewer == f"rev-wang-{people.operator}"
    assert review.population_last_event_id == population[-1]
    sampled = [a.action.event_id for a in review.actions]
    assert sampled == random.Random(42).sample(population, 3)  # anyone can draw it again
    assert {a.operator for a in review.actions} == {people.operator}
    assert all(a.action.service == "eligibility" and a.action.reason for a in review.actions)
    assert (review.pending, [a.verdict for a in review.actions]) == (3, ["", "", ""])

    ok = await people.supervisor.ReviewOperatorAction(
        cases_pb2.ReviewOperatorActionRequest(
            review_id=review.review_id, event_id=sampled[0], verdict="OK", reason="as documented"
        )
    )
    assert ([a.verdict for a in ok.actions], ok.pending) == (["OK", "", ""], 2)
    flagged = await people.supervisor.ReviewOperatorAction(
        cases_pb2.ReviewOperatorActionRequest(
            review_id=review.review_id, event_id=sampled[1], verdict="FLAGGED", note=NOTE
        )
    )
    assert [a.verdict for a in flagged.actions] == ["OK", "FLAGGED", ""]
    case_id = flagged.actions[1].case_id
    assert case_id
    case = await people.auditor.GetCase(cases_pb2.GetCaseRequest(case_id=case_id))
    assert (case.kind, case.status, case.priority, case.subject) == (
        "SUPERVISOR_REVIEW",
        "OPEN",
        "HIGH",
        people.operator,
    )
    assert review.review_id in case.summary and case.text_length == len(NOTE)
    assert case.text == ""  # sealed; a person reveals it, and that is recorded
    revealed = await people.supervisor.GetCase(
        cases_pb2.GetCaseRequest(case_id=case_id, reveal_text=True)
    )
    assert revealed.text == NOTE
    # The auditor reads the review as it stands.
    again = await people.auditor.GetReview(cases_pb2.GetReviewRequest(review_id=review.review_id))
    assert [a.verdict for a in again.actions] == ["OK", "FLAGGED", ""]
    assert [a.action.event_id for a in again.actions] == sampled


async def test_refusals_change_nothing(
    platform: Platform, people: People, rng: random.Random
) -> None:
    p = platform
    await actions_of(p, people, rng, 4)
    me = people.operator
    sample = cases_pb2.SampleOperatorActionsRequest(size=2, operator=me, seed=7)
    # An operator reviewing their own actions, with an approver's certificate in their name.
    assert await refused(people.as_themself.SampleOperatorActions(sample)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "SELF_REVIEW",
        "operator",
    )
    # Everyone's sample never holds the reviewer's own actions.
    everyone = await people.as_themself.SampleOperatorActions(
        cases_pb2.SampleOperatorActionsRequest(size=200, seed=7)
    )
    assert everyone.actions and me not in {a.operator for a in everyone.actions}
    # Operators do not draw reviews at all.
    code, _, _ = await refused(people.operator_stub.SampleOperatorActions(sample))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for bad, reason in (
        (cases_pb2.SampleOperatorActionsRequest(size=0, operator=me), "INVALID_SIZE"),
        (cases_pb2.SampleOperatorActionsRequest(size=2, operator="nobody"), "NOTHING_TO_REVIEW"),
    ):  # fmt: skip
        assert (await refused(people.supervisor.SampleOperatorActions(bad)))[1] == reason

    review = await people.supervisor.SampleOperatorActions(sample)
    first = review.actions[0].action.event_id

    def mark(
        review_id: str, event_id: str, verdict: str, note: str = ""
    ) -> cases_pb2.ReviewOperatorActionRequest:
        return cases_pb2.ReviewOperatorActionRequest(
            review_id=review_id, event_id=event_id, verdict=verdict, note=note
        )

    assert await refused(
        people.supervisor.ReviewOperatorAction(mark("review-none", first, "OK"))
    ) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_REVIEW", "review_id")
    assert await refused(
        people.auditor.GetReview(cases_pb2.GetReviewRequest(review_id="review-none"))
    ) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_REVIEW", "review_id")
    await people.supervisor.ReviewOperatorAction(mark(review.review_id, first, "OK"))
    for stub, request, expected in (
        (people.supervisor, mark(review.review_id, first, "FLAGGED", NOTE),
         (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_REVIEWED", "event_id")),
        (people.other_supervisor, mark(review.review_id, review.actions[1].action.event_id, "OK"),
         (grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_REVIEW", "review_id")),
        (people.supervisor, mark(review.review_id, review.actions[1].action.event_id, "FLAGGED"),
         (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD", "note")),
        (people.supervisor, mark(review.review_id, "not-sampled", "OK"),
         (grpc.StatusCode.NOT_FOUND, "ACTION_NOT_SAMPLED", "event_id")),
    ):  # fmt: skip
        assert await refused(stub.ReviewOperatorAction(request)) == expected
    after = await people.auditor.GetReview(cases_pb2.GetReviewRequest(review_id=review.review_id))
    assert [(a.verdict, a.case_id) for a in after.actions] == [("OK", ""), ("", "")]


async def test_reviews_from_the_command_line(
    platform: Platform, people: People, rng: random.Random, tmp_path: Path
) -> None:
    p = platform
    population = await actions_of(p, people, rng, 4)
    at = ("--audit", f"127.0.0.1:{p.running['audit'].port}")
    supervisor, auditor = (
        identity_dir(p.infra.identities(who), tmp_path / who.principal)
        for who in (
            Caller(Role.APPROVER, f"cli-wang-{people.operator}"),
            Caller(Role.AUDITOR, f"cli-sun-{people.operator}"),
        )
    )
    args = ("--size", "2", "--operator", people.operator, "--seed", "9", "--json")
    code, review, err = await subsidyctl("cases", "review-sample", *args, *at, identity=supervisor)
    assert code == 0, err
    drawn = [a["action"]["event_id"] for a in review["actions"]]
    assert drawn == random.Random(9).sample(population, 2)
    assert (review["seed"], review["population"], review["pending"]) == (9, 4, 2)
    code, marked, err = await subsidyctl(
        "cases", "review-mark", review["review_id"], drawn[0], "--ok", "--json", *at,
        identity=supervisor,
    )  # fmt: skip
    assert code == 0 and marked["pending"] == 1, err
    code, shown, err = await subsidyctl(
        "cases", "review-show", review["review_id"], "--json", *at, identity=auditor
    )
    assert code == 0, err
    assert [a.get("verdict", "") for a in shown["actions"]] == ["OK", ""]
    code, again, err = await subsidyctl(
        "cases", "review-mark", review["review_id"], drawn[0], "--ok", "--json", *at,
        identity=supervisor,
    )  # fmt: skip
    assert (code, again) == (2, {}) and '"reason": "ALREADY_REVIEWED"' in err


async def test_the_reviews_read_model_rebuilds_from_the_events_to_the_same_rows(
    platform: Platform, people: People, rng: random.Random
) -> None:
    p = platform
    await actions_of(p, people, rng, 3)
    review = await people.supervisor.SampleOperatorActions(
        cases_pb2.SampleOperatorActionsRequest(size=2, operator=people.operator)
    )
    for action, verdict, note in zip(review.actions, ("OK", "FLAGGED"), ("", NOTE), strict=True):
        await people.supervisor.ReviewOperatorAction(
            cases_pb2.ReviewOperatorActionRequest(
                review_id=review.review_id,
                event_id=action.action.event_id,
                verdict=verdict,
                note=note,
            )
        )
    await p.quiesce()
    store = p.running["audit"].runtime.store

    async def rows() -> list[object]:
        async with store.engine.connect() as conn:
            heads = (await conn.execute(select(reviews).order_by(reviews.c.review_id))).all()
            actions = (
                await conn.execute(
                    select(review_actions).order_by(
                        review_actions.c.review_id, review_actions.c.position
                    )
                )
            ).all()
        return [*heads, *actions]

    before = await rows()
    assert any(getattr(r, "verdict", "") == "FLAGGED" for r in before)
    await store.rebuild(TABLES, apply_event)
    assert await rows() == before
