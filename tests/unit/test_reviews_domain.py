"""Supervisor reviews of operator actions: the rules, decided without I/O."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit import reviews_domain as d
from services.kernel.errors import DomainError
from subsidy.v1 import events_pb2 as ev

NOW = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
LI = [d.Candidate(f"e-li-{i:02d}", "li") for i in range(20)]
WANG = [d.Candidate(f"e-wang-{i:02d}", "wang") for i in range(5)]  # the supervisor's own
ZHAO = [d.Candidate(f"e-zhao-{i:02d}", "zhao") for i in range(5)]
EVERYONE = [*LI, *WANG, *ZHAO]


def sampled(operator: str = "li", size: int = 5, seed: int = 7) -> d.Review:
    cmd = d.Sample("r1", "wang", operator, size, seed, EVERYONE, NOW)
    review = None
    for event in d.sample(None, cmd):
        review = d.evolve(review, event)
    assert review is not None
    return review


def drawn(cmd: d.Sample) -> ev.OperatorActionsSampled:
    [event] = d.sample(None, cmd)
    assert isinstance(event, ev.OperatorActionsSampled)
    return event


def marked(review: d.Review, cmd: d.Mark) -> ev.OperatorActionReviewed:
    [event] = d.mark(review, cmd)
    assert isinstance(event, ev.OperatorActionReviewed)
    return event


def after(review: d.Review, event: ev.OperatorActionReviewed) -> d.Review:
    out = d.evolve(review, event)
    assert out is not None
    return out


def refused(exc: pytest.ExceptionInfo[DomainError]) -> tuple[str, str]:
    return exc.value.reason, exc.value.field or ""


def test_a_sample_is_drawn_from_the_operators_actions_and_recorded_with_its_seed() -> None:
    event = drawn(d.Sample("r1", "wang", "li", 5, 7, EVERYONE, NOW))
    assert (event.review_id, event.reviewer, event.operator, event.seed) == ("r1", "wang", "li", 7)
    assert (event.size, event.population, event.population_last_event_id) == (5, 20, "e-li-19")
    assert len(event.event_ids) == 5 and len(set(event.event_ids)) == 5
    assert set(event.operators) == {"li"}
    # Anyone can draw it again from what the event records.
    again = random.Random(event.seed).sample(LI[: event.population], event.size)
    assert [c.event_id for c in again] == list(event.event_ids)


def test_everyones_sample_leaves_out_the_reviewers_own_actions() -> None:
    event = drawn(d.Sample("r1", "wang", "", 30, 1, EVERYONE, NOW))
    assert event.population == len(LI) + len(ZHAO)
    assert "wang" not in set(event.operators)
    assert len(event.event_ids) == 25  # a size beyond the population takes all of it


@given(seed=st.integers(0, 2**64 - 1), size=st.integers(1, 40))
def test_the_same_seed_draws_the_same_sample_and_never_the_reviewers(seed: int, size: int) -> None:
    one = drawn(d.Sample("r", "wang", "", size, seed, EVERYONE, NOW))
    two = drawn(d.Sample("r", "wang", "", size, seed, EVERYONE, NOW))
    assert one == two
    assert "wang" not in set(one.operators)


def test_refusals_of_a_sample() -> None:
    with pytest.raises(DomainError) as exc:
        d.sample(None, d.Sample("r1", "wang", "wang", 5, 1, EVERYONE, NOW))
    assert refused(exc) == ("SELF_REVIEW", "operator")
    for size in (0, d.MAX_SAMPLE + 1):
        with pytest.raises(DomainError) as exc:
            d.sample(None, d.Sample("r1", "wang", "li", size, 1, EVERYONE, NOW))
        assert refused(exc) == ("INVALID_SIZE", "size")
    with pytest.raises(DomainError) as exc:
        d.sample(None, d.Sample("r1", "wang", "nobody", 5, 1, EVERYONE, NOW))
    assert refused(exc) == ("NOTHING_TO_REVIEW", "operator")
    assert d.sample(sampled(), d.Sample("r1", "wang", "li", 5, 1, EVERYONE, NOW)) == []  # repeat


def test_each_sampled_action_is_marked_once_and_a_flag_names_its_case() -> None:
    review = sampled()
    first, second = review.sampled[0].event_id, review.sampled[1].event_id
    review = after(review, marked(review, d.Mark(first, d.OK, "wang", NOW)))
    assert review.verdict(first) == d.OK and review.pending == 4
    case_id = d.flag_case_id("r1", second)
    flag = marked(review, d.Mark(second, d.FLAGGED, "wang", NOW, "ab" * 32, 12, case_id))
    assert (flag.verdict, flag.operator, flag.case_id, flag.note_length) == (
        d.FLAGGED,
        "li",
        case_id,
        12,
    )
    review = after(review, flag)
    assert review.pending == 3
    with pytest.raises(DomainError) as exc:
        d.mark(review, d.Mark(first, d.FLAGGED, "wang", NOW, "ab" * 32, 3, "c"))
    assert refused(exc) == ("ALREADY_REVIEWED", "event_id")
    assert review.verdict(first) == d.OK  # unchanged


def test_refusals_of_a_mark() -> None:
    review = sampled()
    action = review.sampled[0].event_id
    cases = [
        (None, d.Mark(action, d.OK, "wang", NOW), ("UNKNOWN_REVIEW", "review_id")),
        (review, d.Mark(action, d.OK, "zhao", NOW), ("NOT_YOUR_REVIEW", "review_id")),
        (review, d.Mark("e-zhao-00", d.OK, "wang", NOW), ("ACTION_NOT_SAMPLED", "event_id")),
        (review, d.Mark(action, "MAYBE", "wang", NOW), ("INVALID_CHOICE", "verdict")),
        (review, d.Mark(action, d.FLAGGED, "wang", NOW), ("MISSING_FIELD", "note")),
    ]
    for state, cmd, expected in cases:
        with pytest.raises(DomainError) as exc:
            d.mark(state, cmd)
        assert refused(exc) == expected
    assert review.pending == 5
