"""Supervisor reviews of operator actions, pure: state + command -> events, and evolve.
No I/O, no clock, no randomness of its own: the time and the seed come in the command.

Internal supervision (docs/cases.md, "Supervisor reviews"): a supervisor, an approver, draws a
random sample of the recorded operator actions (one person's, or everyone's but their own),
then marks each sampled action reviewed OK or FLAGGED with a note; a flag opens a case about
the person whose action it was. The sample is reproducible: it is
``random.Random(seed).sample`` over the population in a stated order, and the review's event
records the seed, the population's size and its last action, so anyone can draw it again.
Nobody reviews their own actions, each sampled action is reviewed once, and only by the
review's own supervisor.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from google.protobuf.message import Message

from services.kernel.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from subsidy.v1 import events_pb2 as ev

OK: Final = "OK"
FLAGGED: Final = "FLAGGED"
VERDICTS: Final = (OK, FLAGGED)
MAX_SAMPLE: Final = 200


@dataclass(frozen=True)
class Candidate:
    """A recorded action that may be sampled: its event id and whose action it is."""

    event_id: str
    operator: str


@dataclass(frozen=True)
class Review:
    """One review as its stream has made it: the sample and each action's verdict."""

    review_id: str
    reviewer: str
    operator: str
    sampled: tuple[Candidate, ...]
    verdicts: tuple[tuple[str, str], ...] = ()  # (event_id, verdict), in review order

    def verdict(self, event_id: str) -> str:
        """The action's verdict ("" while not reviewed)."""
        return dict(self.verdicts).get(event_id, "")

    @property
    def pending(self) -> int:
        return len(self.sampled) - len(self.verdicts)


@dataclass(frozen=True)
class Sample:
    """Draw a sample of ``population`` (ordered by occurred-at, then event id) for review."""

    review_id: str
    reviewer: str
    operator: str  # "" = everyone's
    size: int
    seed: int
    population: Sequence[Candidate]
    now: dt.datetime


@dataclass(frozen=True)
class Mark:
    """Mark one sampled action reviewed; a flag's note is sealed elsewhere (only its digest
    and length are here) and ``case_id`` names the case the flag opens."""

    event_id: str
    verdict: str
    reviewer: str
    now: dt.datetime
    note_sha256: str = ""
    note_length: int = 0
    case_id: str = ""


def unknown_review() -> NotFound:
    return NotFound("UNKNOWN_REVIEW", "review_id: no such review", field="review_id")


def self_review() -> PermissionDenied:
    return PermissionDenied(
        "SELF_REVIEW", "operator: nobody reviews their own actions", field="operator"
    )


def draw(population: Sequence[Candidate], size: int, seed: int) -> list[Candidate]:
    """The sample: ``random.Random(seed).sample`` of ``population`` as given (at most all of
    it). The same population and seed always draw the same actions in the same order."""
    return random.Random(seed).sample(list(population), min(size, len(population)))


def sample(existing: Review | None, cmd: Sample) -> list[Message]:
    """A new review of a random sample of the population (the same review id again: a repeat,
    nothing changes). Refused: the reviewer naming themselves, a size out of range, nothing to
    review. The reviewer's own actions are never in a sample."""
    if existing is not None:
        return []
    if cmd.operator and cmd.operator == cmd.reviewer:
        raise self_review()
    if not 1 <= cmd.size <= MAX_SAMPLE:
        raise InvalidArgument("INVALID_SIZE", f"size: 1..{MAX_SAMPLE}", field="size")
    population = [
        c
        for c in cmd.population
        if c.operator != cmd.reviewer and (not cmd.operator or c.operator == cmd.operator)
    ]
    if not population:
        who = cmd.operator or "anyone but the reviewer"
        raise FailedPrecondition(
            "NOTHING_TO_REVIEW", f"operator: no recorded action of {who}", field="operator"
        )
    drawn = draw(population, cmd.size, cmd.seed)
    event = ev.OperatorActionsSampled(
        review_id=cmd.review_id,
        reviewer=cmd.reviewer,
        operator=cmd.operator,
        seed=cmd.seed,
        size=cmd.size,
        population=len(population),
        population_last_event_id=population[-1].event_id,
        event_ids=[c.event_id for c in drawn],
        operators=[c.operator for c in drawn],
    )
    event.at.FromDatetime(cmd.now)
    return [event]


def mark(review: Review | None, cmd: Mark) -> list[Message]:
    """One sampled action reviewed, once, by the review's own supervisor; a flag needs a note
    and names the case it opens."""
    if review is None:
        raise unknown_review()
    if cmd.reviewer != review.reviewer:
        raise PermissionDenied(
            "NOT_YOUR_REVIEW",
            f"review_id: the review is {review.reviewer}'s to carry out",
            field="review_id",
        )
    found = next((c for c in review.sampled if c.event_id == cmd.event_id), None)
    if found is None:
        raise NotFound(
            "ACTION_NOT_SAMPLED", "event_id: not an action of this review", field="event_id"
        )
    if found.operator == cmd.reviewer:  # cannot happen through sample(); kept as the rule
        raise self_review()
    if cmd.verdict not in VERDICTS:
        raise InvalidArgument(
            "INVALID_CHOICE", f"verdict: one of {', '.join(VERDICTS)}", field="verdict"
        )
    already = review.verdict(cmd.event_id)
    if already:
        raise FailedPrecondition(
            "ALREADY_REVIEWED", f"event_id: reviewed already ({already})", field="event_id"
        )
    if cmd.verdict == FLAGGED and (not cmd.note_length or not cmd.case_id):
        raise InvalidArgument("MISSING_FIELD", "note: required to flag an action", field="note")
    event = ev.OperatorActionReviewed(
        review_id=review.review_id,
        event_id=cmd.event_id,
        verdict=cmd.verdict,
        operator=found.operator,
        case_id=cmd.case_id if cmd.verdict == FLAGGED else "",
        note_sha256=cmd.note_sha256,
        note_length=cmd.note_length,
    )
    event.at.FromDatetime(cmd.now)
    return [event]


def flag_case_id(review_id: str, event_id: str) -> str:
    """The case a flagged action opens: one per (review, action)."""
    return "rev-" + hashlib.sha256(f"{review_id}\0{event_id}".encode()).hexdigest()[:32]


def evolve(review: Review | None, event: Message) -> Review | None:
    """The review after ``event``; the read model and any replay call this."""
    if isinstance(event, ev.OperatorActionsSampled):
        return Review(
            review_id=event.review_id,
            reviewer=event.reviewer,
            operator=event.operator,
            sampled=tuple(
                Candidate(e, o) for e, o in zip(event.event_ids, event.operators, strict=True)
            ),
        )
    if review is None:
        return None
    if isinstance(event, ev.OperatorActionReviewed):
        return replace(review, verdicts=(*review.verdicts, (event.event_id, event.verdict)))
    return review
