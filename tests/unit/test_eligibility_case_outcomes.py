"""A supervision case's outcome, carried out by eligibility: restore or forfeit a
qualification, naming the case. Pure decisions, no infrastructure; "now" comes from the test."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from services.eligibility import domain
from services.eligibility.domain import (
    AVAILABLE,
    EXPIRED,
    FORFEITED,
    LOCKED,
    USED,
    CaseForfeit,
    CaseRestore,
    Qualification,
    evolve,
    forfeit_by_case,
    restore_by_case,
)
from services.kernel.contract.policy import default_policy
from services.kernel.errors import FailedPrecondition, NotFound
from subsidy.v1 import events_pb2 as ev

POLICY = default_policy()
NOW = dt.datetime(2025, 6, 10, 2, 0, tzinfo=dt.UTC)


def qualification(status: str, expires_at: dt.datetime) -> Qualification:
    return Qualification(
        qualification_id="q-1",
        consumer_id="c-1",
        category=POLICY.categories[0].code,
        channel="jd",
        status=status,
        order_id="o-1" if status in (LOCKED, USED, FORFEITED) else "",
        quota_day="2025-06-01",
        expires_at=expires_at,
    )


RESTORE = CaseRestore("q-1", "case-1", "merchant shipped nothing", NOW)
FORFEIT = CaseForfeit("q-1", "case-1", "claimed with a borrowed identity")


def test_a_case_restores_a_forfeited_qualification_and_the_event_names_the_case() -> None:
    q = qualification(FORFEITED, NOW + dt.timedelta(days=1))
    [event] = restore_by_case(q, RESTORE, POLICY)
    assert isinstance(event, ev.QualificationRestored)
    assert event.case_id == "case-1" and event.reason == "merchant shipped nothing"
    assert not event.HasField("expires_at")  # still valid: its own expiry stands
    after = evolve(q, event)
    assert after is not None
    assert after.status == AVAILABLE and after.order_id == ""
    assert after.expires_at == q.expires_at
    # It counted against the person's limit before and still does: the limit holds.
    assert q.counts_against_limit(NOW) and after.counts_against_limit(NOW)


def test_a_restore_after_the_validity_ran_out_gives_a_fresh_validity_from_now() -> None:
    q = qualification(FORFEITED, NOW - dt.timedelta(days=2))
    [event] = restore_by_case(q, RESTORE, POLICY)
    assert isinstance(event, ev.QualificationRestored)
    expected = NOW + dt.timedelta(days=POLICY.qualification_validity_days)
    assert event.expires_at.ToDatetime(tzinfo=dt.UTC) == expected
    after = evolve(q, event)
    assert after is not None and after.expires_at == expected and not after.lapsed(NOW)


def test_restoring_again_changes_nothing() -> None:
    q = qualification(FORFEITED, NOW + dt.timedelta(days=1))
    after = evolve(q, restore_by_case(q, RESTORE, POLICY)[0])
    assert restore_by_case(after, RESTORE, POLICY) == []


@pytest.mark.parametrize("status", [LOCKED, USED, EXPIRED])
def test_only_a_forfeited_qualification_can_be_restored(status: str) -> None:
    q = qualification(status, NOW + dt.timedelta(days=1))
    with pytest.raises(FailedPrecondition) as err:
        restore_by_case(q, RESTORE, POLICY)
    assert err.value.reason == "QUALIFICATION_NOT_RESTORABLE"
    assert err.value.field == "qualification_id"


def test_a_case_forfeits_an_available_qualification_once() -> None:
    q = qualification(AVAILABLE, NOW + dt.timedelta(days=1))
    [event] = forfeit_by_case(q, FORFEIT)
    assert isinstance(event, ev.QualificationForfeited) and event.case_id == "case-1"
    after = evolve(q, event)
    assert after is not None and after.status == FORFEITED
    assert after.counts_against_limit(NOW)  # no new claim replaces it
    assert forfeit_by_case(after, FORFEIT) == []


@pytest.mark.parametrize("status", [LOCKED, USED, EXPIRED])
def test_a_qualification_held_by_an_order_or_expired_is_not_forfeited(status: str) -> None:
    with pytest.raises(FailedPrecondition) as err:
        forfeit_by_case(qualification(status, NOW + dt.timedelta(days=1)), FORFEIT)
    assert err.value.reason == "QUALIFICATION_NOT_FORFEITABLE"


def test_an_unknown_qualification_is_not_found() -> None:
    with pytest.raises(NotFound):
        restore_by_case(None, RESTORE, POLICY)
    with pytest.raises(NotFound):
        forfeit_by_case(None, FORFEIT)


def test_a_refund_restore_keeps_its_expiry() -> None:
    """The refund's restore (no expires_at) leaves the claim's expiry as it was."""
    q = replace(qualification(USED, NOW + dt.timedelta(days=1)))
    after = evolve(q, ev.QualificationRestored(qualification_id="q-1", order_id="o-1"))
    assert after is not None and after.expires_at == q.expires_at
    assert domain.AVAILABLE == after.status
