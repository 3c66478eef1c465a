"""Eligibility decisions, pure: state + command -> events, and how each event changes a
qualification. No I/O, no clock: the time a command is decided at comes in as ``now``.

A consumer registers once (three factors confirmed by the identity authority) and claims
qualifications, one category at a time, inside the policy's daily window and campaign region,
within the per-person limit, the re-claim limit and the day's quota. A qualification is
AVAILABLE until it EXPIRES (the sweeper records it); the ledger LOCKS it to one order at
checkout; the order's payment makes it USED; a cancellation, an expiry or a refused reservation
UNLOCKS it; a refund RESTORES it (at once or from the next day) or FORFEITS it under the order's
own policy version. docs/architecture.md
and ../shared/domain.md give the rules these functions enforce.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final
from zoneinfo import ZoneInfo

from google.protobuf.message import Message

from services.kernel.contract.circumstances import in_region
from services.kernel.contract.policy import CategoryRule, Policy, RefundRule
from services.kernel.contract.policy_document import hhmm_text
from services.kernel.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from subsidy.v1 import events_pb2 as ev

AVAILABLE: Final = "AVAILABLE"
LOCKED: Final = "LOCKED"
USED: Final = "USED"
FORFEITED: Final = "FORFEITED"
EXPIRED: Final = "EXPIRED"
STATUSES: Final = (AVAILABLE, LOCKED, USED, FORFEITED, EXPIRED)
# Held by an order: the only statuses the ledger's outcome events act on.
HELD: Final = (LOCKED, USED)

LedgerOutcome = ev.SubsidyCaptured | ev.SubsidyReleased | ev.ReservationRefused


# --------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Qualification:
    """One qualification as the consumer's stream has made it."""

    qualification_id: str
    consumer_id: str
    category: str
    channel: str
    status: str
    order_id: str
    quota_day: str
    expires_at: dt.datetime
    available_from: dt.datetime | None = None  # restored "next day": lockable from then

    def counts_against_limit(self, now: dt.datetime) -> bool:
        """The per-person rule: every qualification the consumer holds or has had counts,
        except one that expired unused (a forfeited one counts as used: a refund under the
        "forfeit" rule does not give the consumer another one)."""
        if self.status == AVAILABLE:
            return self.expires_at > now
        return self.status in (LOCKED, USED, FORFEITED)

    def lapsed(self, now: dt.datetime) -> bool:
        """Expired unused: recorded by the sweeper, or due and not swept yet (the limits read
        the same either way, whenever the sweeper runs)."""
        return self.status == EXPIRED or (self.status == AVAILABLE and self.expires_at <= now)


@dataclass(frozen=True)
class ClaimState:
    """What a claim is decided on, read under the person's lock and the day's quota row lock:
    whether the consumer exists, the person's qualifications of the category (every one they
    have had: the limit and the re-claims are counted from them), and how many the day has
    issued in the category."""

    registered: bool  # registered, and enrolled with the platform the claim comes through
    qualifications: tuple[Qualification, ...]
    issued_today: int
    # The consumers that are one person with the claimant (same user), the claimant among them.
    person: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Register:
    """Register a confirmed person: their data already sealed under their own key, blind
    indexed and masked (no plaintext reaches the domain)."""

    consumer_id: str
    platform_id: str
    name_sealed: bytes
    id_number_sealed: bytes
    phone_sealed: bytes
    id_number_index: str
    phone_index: str
    id_number_masked: str
    phone_masked: str


@dataclass(frozen=True)
class Claim:
    consumer_id: str
    category: str
    channel: str
    qualification_id: str
    now: dt.datetime
    region_code: str = ""  # where the platform says the claim is made from ("": not reported)


@dataclass(frozen=True)
class Lock:
    """The ledger locks a qualification to an order at checkout."""

    qualification_id: str
    order_id: str
    category: str
    consumer_id: str
    platform_id: str
    now: dt.datetime


# --------------------------------------------------------------------------------------------
# Decisions


def identity_mismatch() -> FailedPrecondition:
    """What the caller learns of a failed three-factor check: that it failed, never which
    factor (told which, a caller holding a masked phone could recover the full number by
    trying the masked digits one registration at a time)."""
    return FailedPrecondition(
        "IDENTITY_MISMATCH", "the identity authority did not confirm name, ID number and phone"
    )


def check_attempts(failures_today: int, limit: int) -> None:
    """At most ``limit`` failed checks per ID number and day; then registration with that ID
    number is refused until the next day, before the authority is even asked."""
    if failures_today >= limit:
        raise ResourceExhausted(
            "IDENTITY_ATTEMPTS_EXCEEDED",
            f"id_number: {limit} failed identity checks today; try again tomorrow",
            field="id_number",
        )


def record_mismatch(
    id_number_index: str, authority_reason: str, platform_id: str, day: str
) -> list[Message]:
    """The failed check, with the authority's precise reason, for operators."""
    return [
        ev.IdentityCheckFailed(
            id_number_index=id_number_index,
            authority_reason=authority_reason,
            platform_id=platform_id,
            day=day,
        )
    ]


def register(existing: object | None, cmd: Register) -> list[Message]:
    """A confirmed person becomes a consumer, once."""
    if existing is not None:  # consumer ids are fresh: a collision is a bug, not a retry
        raise FailedPrecondition("CONSUMER_EXISTS", "consumer_id: registered already")
    return [
        ev.ConsumerRegistered(
            consumer_id=cmd.consumer_id,
            name_sealed=cmd.name_sealed,
            id_number_sealed=cmd.id_number_sealed,
            phone_sealed=cmd.phone_sealed,
            id_number_index=cmd.id_number_index,
            phone_index=cmd.phone_index,
            id_number_masked=cmd.id_number_masked,
            phone_masked=cmd.phone_masked,
            platform_id=cmd.platform_id,
        )
    ]


def enrol(enrolled_with: frozenset[str], consumer_id: str, platform_id: str) -> list[Message]:
    """A registered person registering again through another platform: that platform may serve
    them from now on (once; the same platform again changes nothing)."""
    if platform_id in enrolled_with:
        return []
    return [ev.ConsumerEnrolled(consumer_id=consumer_id, platform_id=platform_id)]


def visible(q: Qualification | None, platform: str | None) -> Qualification | None:
    """A platform sees only the qualifications claimed through it; to it, any other is as
    unknown as one that does not exist (so ids cannot be probed)."""
    if q is None or (platform is not None and q.channel != platform):
        return None
    return q


def held(qualifications: Iterable[Qualification], now: dt.datetime) -> int:
    """How many of a person's qualifications of one category count against their limit."""
    return sum(1 for q in qualifications if q.counts_against_limit(now))


def lapsed(qualifications: Iterable[Qualification], now: dt.datetime) -> int:
    """How many of a person's qualifications of one category expired unused: each claim after
    one of them is a re-claim."""
    return sum(1 for q in qualifications if q.lapsed(now))


def check_window(policy: Policy, now: dt.datetime) -> None:
    """Claims are taken only inside the policy's daily window, in the campaign's time zone."""
    window = policy.claim_window
    if not window.is_open(now):
        raise FailedPrecondition(
            "OUTSIDE_WINDOW",
            f"claims open daily {hhmm_text(window.opens)}-{hhmm_text(window.closes)}"
            f" ({window.timezone})",
        )


def check_region(policy: Policy, region_code: str) -> None:
    """The delivery or GPS region the platform reports must lie inside the campaign's."""
    if not region_code or not in_region(region_code, policy.campaign.regions):
        raise FailedPrecondition(
            "OUTSIDE_REGION",
            "circumstances.region_code: not reported, or outside the campaign's regions",
            field="circumstances.region_code",
        )


def quota_day(policy: Policy, now: dt.datetime) -> str:
    """The day a claim counts against, in the campaign's own time zone."""
    return now.astimezone(ZoneInfo(policy.claim_window.timezone)).date().isoformat()


def category_rule(policy: Policy, category: str) -> CategoryRule:
    rule = policy.category(category)
    if rule is None:
        raise InvalidArgument(
            "UNKNOWN_CATEGORY", "category: not a category of the policy in force", field="category"
        )
    return rule


def check_claimable(policy: Policy, cmd: Claim) -> CategoryRule:
    """What a claim is refused on before anything is read: the category, the window, the
    region (the use case checks these first, so a refused rush costs no lock)."""
    rule = category_rule(policy, cmd.category)
    check_window(policy, cmd.now)
    check_region(policy, cmd.region_code)
    return rule


def claim(state: ClaimState, cmd: Claim, policy: Policy) -> list[Message]:
    """A registered consumer claims one qualification of a category, inside the window and
    the region, within their limit, their re-claims and the day's quota; it is valid for the
    policy's validity period."""
    rule = check_claimable(policy, cmd)
    if not state.registered:
        raise NotFound("UNKNOWN_CONSUMER", "consumer_id: not registered", field="consumer_id")
    if held(state.qualifications, cmd.now) >= rule.per_person_limit:
        raise ResourceExhausted(
            "PERSON_LIMIT_REACHED",
            f"category: the limit of {rule.per_person_limit} per person is reached",
            field="category",
        )
    if lapsed(state.qualifications, cmd.now) > policy.reclaim_limit:
        raise ResourceExhausted(
            "RECLAIM_LIMIT_REACHED",
            f"category: qualifications expired unused more than {policy.reclaim_limit} "
            "times; no more re-claims",
            field="category",
        )
    if state.issued_today >= rule.daily_quota:
        raise ResourceExhausted(
            "DAILY_QUOTA_EXHAUSTED",
            f"category: today's quota of {rule.daily_quota} is used up",
            field="category",
        )
    claimed = ev.QualificationClaimed(
        qualification_id=cmd.qualification_id,
        consumer_id=cmd.consumer_id,
        category=cmd.category,
        channel=cmd.channel,
        quota_day=quota_day(policy, cmd.now),
    )
    claimed.expires_at.FromDatetime(
        cmd.now.astimezone(dt.UTC) + dt.timedelta(days=policy.qualification_validity_days)
    )
    return [claimed]


def unknown_qualification() -> NotFound:
    return NotFound(
        "UNKNOWN_QUALIFICATION", "qualification_id: no such qualification", field="qualification_id"
    )


def lock(q: Qualification | None, cmd: Lock) -> list[Message]:
    """Lock an available, unexpired qualification to one order, for the consumer who owns it,
    through the channel it was claimed in, for an item of its category."""
    if q is None:
        raise unknown_qualification()
    if q.consumer_id != cmd.consumer_id:
        raise FailedPrecondition(
            "QUALIFICATION_NOT_OWNED",
            "qualification_id: belongs to another consumer",
            field="qualification_id",
        )
    if q.status == LOCKED and q.order_id == cmd.order_id:
        return []  # idempotent: the ledger retries a lock whose answer it lost
    if q.channel != cmd.platform_id:
        # A qualification is claimed through one channel and redeemed there only.
        raise FailedPrecondition(
            "CHANNEL_MISMATCH",
            f"qualification_id: claimed through {q.channel}, not {cmd.platform_id}",
            field="qualification_id",
        )
    if q.category != cmd.category:
        raise FailedPrecondition(
            "CATEGORY_MISMATCH",
            f"qualification_id: for {q.category}, the item is {cmd.category}",
            field="qualification_id",
        )
    if q.status != AVAILABLE:
        raise FailedPrecondition(
            f"QUALIFICATION_{q.status}",
            f"qualification_id: is {q.status}",
            field="qualification_id",
        )
    if q.expires_at <= cmd.now:
        raise FailedPrecondition(
            "QUALIFICATION_EXPIRED", "qualification_id: has expired", field="qualification_id"
        )
    if q.available_from is not None and cmd.now < q.available_from:
        raise FailedPrecondition(
            "QUALIFICATION_NOT_YET_AVAILABLE",
            f"qualification_id: restored after a refund; usable from {q.available_from:%Y-%m-%d}",
            field="qualification_id",
        )
    return [ev.QualificationLocked(qualification_id=q.qualification_id, order_id=cmd.order_id)]


def consumed(q: Qualification | None, order_id: str) -> Qualification:
    """The qualification as the payment of ``order_id`` left it: locked to that order, or used
    by it once the ledger's SubsidyCaptured has arrived. Any other order is refused."""
    if q is None:
        raise unknown_qualification()
    if q.order_id != order_id or q.status not in HELD:
        raise FailedPrecondition(
            "QUALIFICATION_NOT_LOCKED_TO_ORDER",
            f"qualification_id: is {q.status}, not locked to this order",
            field="order_id",
        )
    return q


def settle(
    q: Qualification | None,
    outcome: LedgerOutcome,
    order_policy: Policy | None,
    at: dt.datetime | None = None,
) -> list[Message]:
    """The ledger's outcome of an order, applied to the qualification that order holds: paid
    -> used; cancelled, expired or refused -> unlocked; refunded (at ``at``) -> restored, at
    once or from the next day, or forfeited by the order's own policy (``order_policy``). Only
    the qualification held by that very order moves: one unlocked already, or since given to
    another order, is left alone. A refund is judged by the event (was the order paid?), not
    by which event arrived first."""
    if q is None or q.order_id != outcome.order_id or q.status not in HELD:
        return []
    qid, order = q.qualification_id, outcome.order_id
    if isinstance(outcome, ev.SubsidyCaptured):
        return (
            [ev.QualificationUsed(qualification_id=qid, order_id=order)]
            if q.status == LOCKED
            else []
        )
    if isinstance(outcome, ev.SubsidyReleased) and outcome.was_captured:
        if order_policy is None or at is None:
            raise ValueError("a refund is settled under the order's policy, at its time")
        rule = order_policy.refund_rule
        if rule is RefundRule.FORFEIT:
            return [
                ev.QualificationForfeited(
                    qualification_id=qid, order_id=order, reason=outcome.reason
                )
            ]
        restored = ev.QualificationRestored(
            qualification_id=qid, order_id=order, reason=outcome.reason
        )
        if rule is RefundRule.RESTORE_NEXT_DAY:
            restored.available_from.FromDatetime(next_day(order_policy, at))
        return [restored]
    if q.status == LOCKED:
        return [
            ev.QualificationUnlocked(qualification_id=qid, order_id=order, reason=outcome.reason)
        ]
    return []


def next_day(policy: Policy, at: dt.datetime) -> dt.datetime:
    """The start of the day after ``at`` in the campaign's time zone, in UTC."""
    zone = ZoneInfo(policy.claim_window.timezone)
    tomorrow = at.astimezone(zone).date() + dt.timedelta(days=1)
    return dt.datetime.combine(tomorrow, dt.time(), zone).astimezone(dt.UTC)


def expire(q: Qualification | None, now: dt.datetime) -> list[Message]:
    """The sweeper: an available qualification past its expiry becomes EXPIRED (one locked to
    an order is left to the order's outcome; the sweeper sees it again if it is unlocked)."""
    if q is None or q.status != AVAILABLE or q.expires_at > now:
        return []
    expired = ev.QualificationExpired(qualification_id=q.qualification_id)
    expired.expired_at.FromDatetime(q.expires_at)
    return [expired]


@dataclass(frozen=True)
class CaseRestore:
    """An operator restores a forfeited qualification as the outcome of a supervision case."""

    qualification_id: str
    case_id: str
    reason: str
    now: dt.datetime


@dataclass(frozen=True)
class CaseForfeit:
    """An operator forfeits an available qualification as the outcome of a supervision case."""

    qualification_id: str
    case_id: str
    reason: str


def not_restorable(q: Qualification, wanted: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"QUALIFICATION_NOT_{wanted}",
        f"qualification_id: is {q.status}",
        field="qualification_id",
    )


def restore_by_case(q: Qualification | None, cmd: CaseRestore, policy: Policy) -> list[Message]:
    """A case finds a qualification forfeited wrongly: it is available again, for a fresh
    validity from now when its own has run out. Only a FORFEITED one: it already counts
    against the person's limit, so the limit holds (an expired one does not count any more,
    and a held one belongs to its order). Restored already (by this or another case, or
    never forfeited and available): nothing to do."""
    if q is None:
        raise unknown_qualification()
    if q.status == AVAILABLE:
        return []
    if q.status != FORFEITED:
        raise not_restorable(q, "RESTORABLE")
    restored = ev.QualificationRestored(
        qualification_id=q.qualification_id, reason=cmd.reason, case_id=cmd.case_id
    )
    if q.expires_at <= cmd.now:
        validity = dt.timedelta(days=policy.qualification_validity_days)
        restored.expires_at.FromDatetime(cmd.now.astimezone(dt.UTC) + validity)
    return [restored]


def forfeit_by_case(q: Qualification | None, cmd: CaseForfeit) -> list[Message]:
    """A case finds a qualification should not be used (e.g. claimed with a borrowed
    identity): an AVAILABLE one is forfeited (it still counts against the limit, so no new
    claim replaces it). Forfeited already: nothing to do. One held by an order is left to the
    order (release or refund it first)."""
    if q is None:
        raise unknown_qualification()
    if q.status == FORFEITED:
        return []
    if q.status != AVAILABLE:
        raise not_restorable(q, "FORFEITABLE")
    return [
        ev.QualificationForfeited(
            qualification_id=q.qualification_id, reason=cmd.reason, case_id=cmd.case_id
        )
    ]


def is_refund(outcome: LedgerOutcome) -> bool:
    """Whether settling ``outcome`` needs the order's refund rule."""
    return isinstance(outcome, ev.SubsidyReleased) and outcome.was_captured


# --------------------------------------------------------------------------------------------
# Evolution: the one place a qualification's status changes


def evolve(q: Qualification | None, event: Message) -> Qualification | None:
    """The qualification after ``event``; the projection and any replay call this."""
    if isinstance(event, ev.QualificationClaimed):
        return Qualification(
            qualification_id=event.qualification_id,
            consumer_id=event.consumer_id,
            category=event.category,
            channel=event.channel,
            status=AVAILABLE,
            order_id="",
            quota_day=event.quota_day,
            expires_at=event.expires_at.ToDatetime(tzinfo=dt.UTC),
        )
    if q is None:
        return None
    if isinstance(event, ev.QualificationLocked):
        return replace(q, status=LOCKED, order_id=event.order_id)
    if isinstance(event, ev.QualificationUsed):
        return replace(q, status=USED, order_id=event.order_id)
    if isinstance(event, ev.QualificationUnlocked):
        return replace(q, status=AVAILABLE, order_id="")
    if isinstance(event, ev.QualificationRestored):
        available_from = (
            event.available_from.ToDatetime(tzinfo=dt.UTC)
            if event.HasField("available_from")
            else None
        )
        expires_at = (
            event.expires_at.ToDatetime(tzinfo=dt.UTC)
            if event.HasField("expires_at")
            else q.expires_at
        )
        return replace(
            q,
            status=AVAILABLE,
            order_id="",
            available_from=available_from,
            expires_at=expires_at,
        )
    if isinstance(event, ev.QualificationExpired):
        return replace(q, status=EXPIRED)
    if isinstance(event, ev.QualificationForfeited):
        return replace(q, status=FORFEITED, order_id=event.order_id)
    return q
