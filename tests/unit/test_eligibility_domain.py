"""Eligibility's rules (services/eligibility/domain.py), read like ../shared/domain.md.

No infrastructure and no wall clock: every decision gets its "now" from the test, so the day's
quota, the validity period and expiry are checked at exact instants.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from services.eligibility import domain
from services.eligibility.domain import (
    AVAILABLE,
    EXPIRED,
    FORFEITED,
    LOCKED,
    USED,
    Claim,
    ClaimState,
    Lock,
    Qualification,
)
from services.invariants import InvariantViolation, check_person_limit
from services.kernel.contract.policy import Policy, RefundRule, default_policy
from services.kernel.contract.policy_model import MIDNIGHT, ClaimWindow
from services.kernel.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted
from subsidy.v1 import events_pb2 as ev

POLICY: Policy = default_policy()
CATEGORY = POLICY.categories[0].code
RULE = POLICY.categories[0]
NOW = dt.datetime(2025, 6, 1, 2, 30, tzinfo=dt.UTC)  # 10:30 in Shenzhen


ALL_DAY = replace(POLICY, claim_window=ClaimWindow(dt.time(0), MIDNIGHT, "Asia/Shanghai"))
IN_REGION = "440310001"  # a township of Pingshan, the campaign's area


def claim_cmd(
    now: dt.datetime = NOW, category: str = CATEGORY, region_code: str = IN_REGION
) -> Claim:
    return Claim("c-1", category, "jd", "q-1", now, region_code)


def state(
    *, registered: bool = True, held: int = 0, lapsed: int = 0, issued: int = 0
) -> ClaimState:
    """A person who holds ``held`` qualifications of the category (used) and let ``lapsed``
    expire unused, on a day that has issued ``issued``."""
    base = Qualification("q-0", "c-1", CATEGORY, "jd", USED, "o-0", "2025-06-01", NOW)
    qs = [replace(base, qualification_id=f"q-h{i}") for i in range(held)]
    qs += [replace(base, qualification_id=f"q-x{i}", status=EXPIRED) for i in range(lapsed)]
    return ClaimState(registered, tuple(qs), issued)


def claimed(now: dt.datetime = NOW) -> Qualification:
    event = domain.claim(state(), claim_cmd(now), POLICY)[0]
    q = domain.evolve(None, event)
    assert q is not None
    return q


def lock_cmd(now: dt.datetime = NOW, **overrides: str) -> Lock:
    fields = {
        "qualification_id": "q-1",
        "order_id": "o-1",
        "category": CATEGORY,
        "consumer_id": "c-1",
        "platform_id": "jd",
    }
    fields.update(overrides)
    return Lock(now=now, **fields)


def reason_of(exc: pytest.ExceptionInfo[DomainError]) -> str:
    return exc.value.reason


# -- claiming --------------------------------------------------------------------------------


def test_a_registered_consumer_claims_one_qualification_valid_for_the_policys_period() -> None:
    [event] = domain.claim(state(), claim_cmd(), POLICY)
    assert isinstance(event, ev.QualificationClaimed)
    assert (event.consumer_id, event.category, event.channel) == ("c-1", CATEGORY, "jd")
    expires = event.expires_at.ToDatetime(tzinfo=dt.UTC)
    assert expires == NOW + dt.timedelta(days=POLICY.qualification_validity_days)


def test_the_quota_day_is_the_campaigns_local_day_not_utcs() -> None:
    late_utc = dt.datetime(2025, 6, 1, 17, 0, tzinfo=dt.UTC)  # 01:00 on 2 June in Shenzhen
    [event] = domain.claim(state(), claim_cmd(late_utc), ALL_DAY)
    assert isinstance(event, ev.QualificationClaimed)
    assert event.quota_day == "2025-06-02"


def test_an_unknown_category_is_refused_before_anything_else() -> None:
    with pytest.raises(DomainError) as err:
        domain.claim(state(registered=False), claim_cmd(category="yacht"), POLICY)
    assert (reason_of(err), err.value.field) == ("UNKNOWN_CATEGORY", "category")


def test_an_unregistered_consumer_cannot_claim() -> None:
    with pytest.raises(NotFound) as err:
        domain.claim(state(registered=False), claim_cmd(), POLICY)
    assert reason_of(err) == "UNKNOWN_CONSUMER"


def test_a_consumer_at_the_per_person_limit_is_refused() -> None:
    domain.claim(state(held=RULE.per_person_limit - 1), claim_cmd(), POLICY)
    with pytest.raises(ResourceExhausted) as err:
        domain.claim(state(held=RULE.per_person_limit), claim_cmd(), POLICY)
    assert (reason_of(err), err.value.field) == ("PERSON_LIMIT_REACHED", "category")


def test_the_days_quota_once_issued_refuses_every_further_claim_that_day() -> None:
    domain.claim(state(issued=RULE.daily_quota - 1), claim_cmd(), POLICY)
    with pytest.raises(ResourceExhausted) as err:
        domain.claim(state(issued=RULE.daily_quota), claim_cmd(), POLICY)
    assert (reason_of(err), err.value.field) == ("DAILY_QUOTA_EXHAUSTED", "category")


def test_what_counts_against_the_limit_held_locked_used_forfeited_but_not_expired() -> None:
    q = claimed()
    valid_until = q.expires_at
    assert q.counts_against_limit(valid_until - dt.timedelta(seconds=1))
    assert not q.counts_against_limit(valid_until)  # expired unused: the consumer may claim again
    for status in (LOCKED, USED, FORFEITED):  # held or spent: counts whatever the date
        assert replace(q, status=status).counts_against_limit(valid_until + dt.timedelta(days=9))
    assert domain.held([q, replace(q, status=USED)], valid_until) == 1


def at_shenzhen(hour: int, minute: int = 0) -> dt.datetime:
    """1 June 2025 at ``hour:minute`` in Shenzhen (UTC+8)."""
    return dt.datetime(2025, 6, 1, hour, minute, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def test_claims_are_taken_only_inside_the_daily_window_in_the_campaigns_time_zone() -> None:
    # The Shenzhen policy opens claims 10:00-23:00 local time.
    for inside in (at_shenzhen(10), at_shenzhen(22, 59)):
        domain.claim(state(), claim_cmd(inside), POLICY)
    for outside in (at_shenzhen(9, 59), at_shenzhen(23), at_shenzhen(3)):
        with pytest.raises(FailedPrecondition) as err:
            domain.claim(state(), claim_cmd(outside), POLICY)
        assert reason_of(err) == "OUTSIDE_WINDOW"
    # 10:00 in Shenzhen is 02:00 UTC: the window is read in the campaign's zone, not UTC's.
    domain.claim(state(), claim_cmd(dt.datetime(2025, 6, 1, 2, 0, tzinfo=dt.UTC)), POLICY)


def test_a_window_to_24_00_is_open_to_the_last_instant_of_the_day() -> None:
    last = dt.datetime(2025, 6, 1, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    domain.claim(state(), claim_cmd(last), ALL_DAY)
    domain.claim(state(), claim_cmd(at_shenzhen(0)), ALL_DAY)


def test_a_claim_must_come_from_inside_the_campaigns_regions() -> None:
    domain.claim(state(), claim_cmd(region_code="440310"), POLICY)  # the district itself
    domain.claim(state(), claim_cmd(region_code="440310003012"), POLICY)  # one of its villages
    for region in ("440311", "110105", ""):  # the next district, Beijing, not reported
        with pytest.raises(FailedPrecondition) as err:
            domain.claim(state(), claim_cmd(region_code=region), POLICY)
        assert (reason_of(err), err.value.field) == ("OUTSIDE_REGION", "circumstances.region_code")


def test_after_expiry_a_consumer_may_claim_again_up_to_the_reclaim_limit() -> None:
    # Shenzhen 2024: at most 2 re-claims. Each expired qualification makes the next claim one.
    assert POLICY.reclaim_limit == 2
    domain.claim(state(lapsed=1), claim_cmd(), POLICY)  # the first re-claim
    domain.claim(state(lapsed=2), claim_cmd(), POLICY)  # the second
    with pytest.raises(ResourceExhausted) as err:
        domain.claim(state(lapsed=3), claim_cmd(), POLICY)  # a third: refused
    assert (reason_of(err), err.value.field) == ("RECLAIM_LIMIT_REACHED", "category")


def test_an_expired_unswept_qualification_counts_as_a_reclaim_the_same_as_a_swept_one() -> None:
    q = claimed()
    later = q.expires_at + dt.timedelta(seconds=1)
    swept = domain.evolve(q, domain.expire(q, later)[0])
    assert swept is not None and swept.status == EXPIRED
    assert q.lapsed(later) and swept.lapsed(later)
    assert domain.lapsed([q], later) == domain.lapsed([swept], later) == 1
    assert domain.held([q], later) == domain.held([swept], later) == 0


def test_the_sweeper_expires_only_an_available_qualification_past_its_expiry() -> None:
    q = claimed()
    assert domain.expire(q, q.expires_at - dt.timedelta(seconds=1)) == []  # not yet
    [event] = domain.expire(q, q.expires_at)
    assert isinstance(event, ev.QualificationExpired)
    assert event.expired_at.ToDatetime(tzinfo=dt.UTC) == q.expires_at  # when, not when swept
    for status in (LOCKED, USED, FORFEITED, EXPIRED):  # held by an order, spent, or done
        assert domain.expire(replace(q, status=status), q.expires_at + dt.timedelta(days=1)) == []
    assert domain.expire(None, NOW) == []


# -- locking at checkout ----------------------------------------------------------------------


def test_the_ledger_locks_an_available_qualification_to_one_order() -> None:
    [event] = domain.lock(claimed(), lock_cmd())
    assert isinstance(event, ev.QualificationLocked)
    assert (event.qualification_id, event.order_id) == ("q-1", "o-1")
    locked = domain.evolve(claimed(), event)
    assert locked is not None and (locked.status, locked.order_id) == (LOCKED, "o-1")


def test_locking_again_for_the_same_order_changes_nothing() -> None:
    locked = replace(claimed(), status=LOCKED, order_id="o-1")
    assert domain.lock(locked, lock_cmd()) == []


@pytest.mark.parametrize(
    ("q", "cmd", "reason"),
    [
        (None, lock_cmd(), "UNKNOWN_QUALIFICATION"),
        (claimed(), lock_cmd(consumer_id="c-2"), "QUALIFICATION_NOT_OWNED"),
        (claimed(), lock_cmd(platform_id="taobao"), "CHANNEL_MISMATCH"),
        (claimed(), lock_cmd(category="phone-not-" + CATEGORY), "CATEGORY_MISMATCH"),
        (replace(claimed(), status=LOCKED, order_id="o-9"), lock_cmd(), "QUALIFICATION_LOCKED"),
        (replace(claimed(), status=USED, order_id="o-9"), lock_cmd(), "QUALIFICATION_USED"),
        (
            replace(claimed(), status=FORFEITED, order_id="o-9"),
            lock_cmd(),
            "QUALIFICATION_FORFEITED",
        ),
    ],
)
def test_a_lock_is_refused_for_each_broken_rule(
    q: Qualification | None, cmd: Lock, reason: str
) -> None:
    with pytest.raises(DomainError) as err:
        domain.lock(q, cmd)
    assert reason_of(err) == reason


def test_an_expired_qualification_cannot_be_locked() -> None:
    q = claimed()
    domain.lock(q, lock_cmd(now=q.expires_at - dt.timedelta(microseconds=1)))
    with pytest.raises(FailedPrecondition) as err:
        domain.lock(q, lock_cmd(now=q.expires_at))
    assert (reason_of(err), err.value.field) == ("QUALIFICATION_EXPIRED", "qualification_id")


# -- the ledger's outcome of the order --------------------------------------------------------


def locked_to(order: str = "o-1") -> Qualification:
    return replace(claimed(), status=LOCKED, order_id=order)


def under(rule: RefundRule) -> Policy:
    """The order's policy version, with refund rule ``rule``."""
    return replace(POLICY, refund_rule=rule)


def settle(
    q: Qualification | None, outcome: domain.LedgerOutcome, rule: RefundRule | None = None
) -> tuple[list[Message], Qualification | None]:
    events = domain.settle(q, outcome, under(rule) if rule else None, NOW)
    after = q
    for e in events:
        after = domain.evolve(after, e)
    return events, after


def test_payment_makes_the_locked_qualification_used_once() -> None:
    events, after = settle(locked_to(), ev.SubsidyCaptured(order_id="o-1"))
    assert [type(e) for e in events] == [ev.QualificationUsed]
    assert after is not None and after.status == USED
    assert domain.settle(after, ev.SubsidyCaptured(order_id="o-1"), None) == []  # redelivered


@pytest.mark.parametrize(
    "outcome",
    [
        ev.SubsidyReleased(order_id="o-1", reason="CANCELLED"),
        ev.SubsidyReleased(order_id="o-1", reason="EXPIRED"),
        ev.ReservationRefused(order_id="o-1", reason="BUDGET_EXHAUSTED"),
    ],
)
def test_a_cancelled_expired_or_refused_order_gives_the_qualification_back(
    outcome: domain.LedgerOutcome,
) -> None:
    events, after = settle(locked_to(), outcome)
    assert [type(e) for e in events] == [ev.QualificationUnlocked]
    assert after is not None and (after.status, after.order_id) == (AVAILABLE, "")


def test_a_refund_restores_or_forfeits_by_the_orders_policy() -> None:
    refund = ev.SubsidyReleased(order_id="o-1", reason="REFUNDED", was_captured=True)
    used = replace(locked_to(), status=USED)
    _, restored = settle(used, refund, RefundRule.RESTORE)
    _, forfeited = settle(used, refund, RefundRule.FORFEIT)
    assert restored is not None and restored.status == AVAILABLE
    assert forfeited is not None and forfeited.status == FORFEITED
    # A refund that overtook its payment is judged by the event: the order was paid.
    _, early = settle(locked_to(), refund, RefundRule.FORFEIT)
    assert early is not None and early.status == FORFEITED
    assert domain.is_refund(refund) and not domain.is_refund(ev.SubsidyCaptured(order_id="o"))


def test_a_refund_under_restore_next_day_gives_it_back_from_the_next_local_midnight() -> None:
    refund = ev.SubsidyReleased(order_id="o-1", reason="REFUNDED", was_captured=True)
    used = replace(locked_to(), status=USED)
    refunded_at = at_shenzhen(23, 30)  # 15:30 UTC, late on 1 June in Shenzhen
    [event] = domain.settle(used, refund, under(RefundRule.RESTORE_NEXT_DAY), refunded_at)
    assert isinstance(event, ev.QualificationRestored)
    after = domain.evolve(used, event)
    assert after is not None and after.status == AVAILABLE
    midnight = at_shenzhen(0) + dt.timedelta(days=1)  # 00:00 on 2 June, Shenzhen time
    assert after.available_from == midnight
    with pytest.raises(FailedPrecondition) as err:
        domain.lock(after, lock_cmd(midnight - dt.timedelta(seconds=1), order_id="o-2"))
    assert reason_of(err) == "QUALIFICATION_NOT_YET_AVAILABLE"
    [locked] = domain.lock(after, lock_cmd(midnight, order_id="o-2"))
    assert isinstance(locked, ev.QualificationLocked)
    # Restored at once, it is lockable at once.
    [now_event] = domain.settle(used, refund, under(RefundRule.RESTORE), refunded_at)
    at_once = domain.evolve(used, now_event)
    assert at_once is not None and at_once.available_from is None


def test_an_outcome_for_another_order_leaves_the_qualification_alone() -> None:
    mine = locked_to("o-2")  # unlocked and since locked to a second order
    for outcome in (
        ev.SubsidyCaptured(order_id="o-1"),
        ev.SubsidyReleased(order_id="o-1", reason="CANCELLED"),
        ev.ReservationRefused(order_id="o-1", reason="ABANDONED"),
    ):
        assert domain.settle(mine, outcome, under(RefundRule.RESTORE), NOW) == []
    assert domain.settle(claimed(), ev.SubsidyCaptured(order_id=""), None) == []
    assert domain.settle(None, ev.SubsidyCaptured(order_id="o-1"), None) == []


def test_only_the_order_holding_it_reads_it_as_consumed() -> None:
    assert domain.consumed(locked_to(), "o-1").status == LOCKED
    with pytest.raises(FailedPrecondition) as err:
        domain.consumed(locked_to(), "o-2")
    assert reason_of(err) == "QUALIFICATION_NOT_LOCKED_TO_ORDER"


def test_a_failed_identity_check_tells_the_caller_nothing_about_which_factor() -> None:
    err = domain.identity_mismatch()
    assert (err.reason, err.field, err.metadata) == ("IDENTITY_MISMATCH", "", {})
    [failed] = domain.record_mismatch("idx-1", "PHONE_MISMATCH", "jd", "2025-06-01")
    assert isinstance(failed, ev.IdentityCheckFailed)
    assert (failed.authority_reason, failed.id_number_index) == ("PHONE_MISMATCH", "idx-1")


def test_failed_checks_per_id_number_and_day_are_limited() -> None:
    domain.check_attempts(4, limit=5)
    with pytest.raises(ResourceExhausted) as err:
        domain.check_attempts(5, limit=5)
    assert (reason_of(err), err.value.field) == ("IDENTITY_ATTEMPTS_EXCEEDED", "id_number")


# -- the invariant, against the rule ----------------------------------------------------------

statuses = st.sampled_from((AVAILABLE, LOCKED, USED, FORFEITED, EXPIRED))
ages = st.integers(0, 2 * POLICY.qualification_validity_days)


@given(st.lists(st.tuples(statuses, ages), max_size=8))
def test_claims_the_rule_allows_never_break_the_person_limit_invariant(
    history: list[tuple[str, int]],
) -> None:
    """Whatever a consumer's qualifications are, a claim is allowed exactly when the invariant
    would still hold after it: the check counts what the rule counts."""
    now = NOW + dt.timedelta(days=2 * POLICY.qualification_validity_days)
    qs = [replace(claimed(now - dt.timedelta(days=age)), status=status) for status, age in history]
    held = domain.held(qs, now)
    allowed = True
    try:
        domain.claim(ClaimState(True, tuple(qs), 0), claim_cmd(now), POLICY)
    except ResourceExhausted as refused:
        # The person limit is judged first; a re-claim refusal is another rule's.
        allowed = refused.reason != "PERSON_LIMIT_REACHED"
    try:
        check_person_limit("c-1", CATEGORY, held=held + 1, limit=RULE.per_person_limit)
        holds_after = True
    except InvariantViolation:
        holds_after = False
    assert allowed == holds_after
