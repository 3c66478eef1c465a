"""The risk engine's rules, as ../shared/domain.md ("Abuse seen in 2025 audits") and issue 10
state them: velocity per device, address, IP and card; address clustering; block and allow lists
with an expiry; versioned rule documents checked strictly. Pure: no database, no Vault."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from services.kernel.contract import risk
from services.kernel.contract.risk import Action, Kind, ListName, Outcome, Subject
from services.kernel.contract.risk_proto import (
    decision_recorded,
    entry_message,
    entry_of,
    rule_set_document,
    rule_set_message,
    rule_set_of,
)

NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=dt.UTC)
DEVICE = Subject(Kind.DEVICE, "idx-device-1", "ab***yz")
ADDRESS = Subject(Kind.ADDRESS, "idx-address-1", "广东省深圳市…(20)")
CARD = Subject(Kind.CARD, "idx-card-1", "****1234")
PERSON = Subject(Kind.PERSON, "c-alice", "c-alice")


def velocity(rule_id: str = "device-claims", **over: Any) -> dict[str, Any]:
    doc = {
        "rule_id": rule_id,
        "kind": "velocity",
        "action": "claim",
        "subject": "device",
        "window_s": 3600,
        "max_count": 3,
        "verdict": "block",
    }
    return doc | over


def cluster(rule_id: str = "address-cluster", **over: Any) -> dict[str, Any]:
    doc = {
        "rule_id": rule_id,
        "kind": "address_cluster",
        "action": "claim",
        "window_s": 86400,
        "max_persons": 5,
        "verdict": "flag",
    }
    return doc | over


def rules(*docs: dict[str, Any], version: int = 7) -> risk.RuleSet:
    return risk.parse_rule_set({"rules": list(docs)}, version)


def entry(
    kind: Kind,
    index: str,
    name: ListName = ListName.BLOCK,
    expires: dt.datetime = NOW + dt.timedelta(days=1),
    entry_id: str = "rle-1",
) -> risk.ListEntry:
    return risk.ListEntry(entry_id, name, kind, index, "masked", expires)


def judge(
    rule_set: risk.RuleSet,
    subjects: dict[Kind, Subject],
    counts: dict[str, int] | None = None,
    lists: risk.Lists | None = None,
    action: Action = Action.CLAIM,
) -> risk.Verdict:
    lists = lists or risk.Lists()
    needed = risk.counts_needed(rule_set, lists, action, subjects, NOW)
    given = counts or {}
    return risk.evaluate(
        rule_set, lists, action, subjects, {c.rule_id: given.get(c.rule_id, 0) for c in needed}, NOW
    )


# -- velocity --------------------------------------------------------------------------------


def test_a_device_may_claim_max_count_times_in_the_window_and_the_next_claim_is_blocked() -> None:
    rs = rules(velocity(max_count=3))
    subjects = {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE}
    assert judge(rs, subjects, {"device-claims": 2}).outcome is Outcome.ALLOW
    blocked = judge(rs, subjects, {"device-claims": 3})
    assert blocked.outcome is Outcome.BLOCK
    assert (blocked.rule_id, blocked.rule_set_version, blocked.field) == (
        "device-claims",
        7,
        "circumstances.device_id",
    )
    # What it used, masked: never the index or the raw value.
    assert dict(blocked.inputs) == {
        "circumstances.device_id": "ab***yz",
        "count": "3",
        "max_count": "3",
        "window_s": "3600",
    }


def test_the_count_asked_for_is_of_the_rule_subject_within_the_rule_window() -> None:
    rs = rules(velocity(window_s=600))
    (count,) = risk.counts_needed(
        rs, risk.Lists(), Action.CLAIM, {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE}, NOW
    )
    assert (count.kind, count.subject, count.since, count.limit) == (
        "velocity",
        DEVICE,
        NOW - dt.timedelta(seconds=600),
        3,
    )


def test_a_rule_about_reservations_does_not_judge_claims_and_a_missing_subject_is_not_judged() -> (
    None
):
    rs = rules(velocity("card-reserves", action="reserve", subject="card", max_count=1))
    # A claim with a card already reserved with: the rule is about reservations only.
    assert judge(rs, {Kind.PERSON: PERSON, Kind.CARD: CARD}, {"card-reserves": 5}).outcome is (
        Outcome.ALLOW
    )
    # A reservation without a card: the card rule has nothing to count.
    assert risk.counts_needed(rs, risk.Lists(), Action.RESERVE, {Kind.PERSON: PERSON}, NOW) == ()
    first = judge(rs, {Kind.CARD: CARD}, {"card-reserves": 0}, action=Action.RESERVE)
    assert first.outcome is Outcome.ALLOW  # no earlier reservation with that card
    second = judge(rs, {Kind.CARD: CARD}, {"card-reserves": 1}, action=Action.RESERVE)
    assert second.outcome is Outcome.BLOCK and second.field == "circumstances.bank_card"


def test_evaluating_without_the_counts_asked_for_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        risk.evaluate(rules(velocity()), risk.Lists(), Action.CLAIM, {Kind.DEVICE: DEVICE}, {}, NOW)


# -- address clustering ----------------------------------------------------------------------


def test_more_than_max_persons_distinct_persons_at_one_address_is_flagged() -> None:
    rs = rules(cluster(max_persons=5))
    subjects = {Kind.PERSON: PERSON, Kind.ADDRESS: ADDRESS}
    (count,) = risk.counts_needed(rs, risk.Lists(), Action.CLAIM, subjects, NOW)
    assert (count.kind, count.person) == ("address_cluster", "c-alice")  # others than her
    assert judge(rs, subjects, {"address-cluster": 4}).outcome is Outcome.ALLOW  # she is 5th
    flagged = judge(rs, subjects, {"address-cluster": 5})  # she would be the 6th
    assert flagged.outcome is Outcome.FLAG
    assert dict(flagged.inputs)["other_persons"] == "5"
    assert flagged.field == "circumstances.delivery_address"


def test_a_block_hit_wins_over_a_flag_hit_and_rules_otherwise_keep_their_order() -> None:
    rs = rules(
        cluster(max_persons=1),
        velocity("address-claims", subject="address", max_count=1),
        velocity("address-claims-strict", subject="address", max_count=1),
    )
    verdict = judge(
        rs,
        {Kind.PERSON: PERSON, Kind.ADDRESS: ADDRESS},
        {"address-cluster": 3, "address-claims": 3, "address-claims-strict": 3},
    )
    assert (verdict.outcome, verdict.rule_id) == (Outcome.BLOCK, "address-claims")


# -- lists -----------------------------------------------------------------------------------


def test_a_device_on_the_block_list_is_blocked_until_the_entry_expires() -> None:
    lists = risk.Lists.of(3, [entry(Kind.DEVICE, DEVICE.index)])
    subjects = {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE}
    verdict = judge(risk.RuleSet(), subjects, lists=lists)
    assert verdict.outcome is Outcome.BLOCK
    assert (verdict.rule_id, verdict.entry_id, verdict.lists_version) == (
        "block-list:device",
        "rle-1",
        3,
    )
    expired = risk.Lists.of(4, [entry(Kind.DEVICE, DEVICE.index, expires=NOW)])
    assert judge(risk.RuleSet(), subjects, lists=expired).outcome is Outcome.ALLOW


@pytest.mark.parametrize("kind", risk.LIST_KINDS)
def test_every_list_kind_blocks_a_claim_or_reservation_naming_it(kind: Kind) -> None:
    subject = Subject(kind, f"idx-{kind}", "m")
    lists = risk.Lists.of(1, [entry(kind, subject.index)])
    verdict = judge(risk.RuleSet(), {kind: subject}, lists=lists, action=Action.RESERVE)
    assert verdict.outcome is Outcome.BLOCK and verdict.field == risk.FIELDS[kind]
    # Another subject of the same kind is not blocked.
    other = Subject(kind, "idx-other", "m")
    assert judge(risk.RuleSet(), {kind: other}, lists=lists).outcome is Outcome.ALLOW


def test_the_allow_list_exempts_its_subject_from_the_rules_but_never_from_a_block_entry() -> None:
    rs = rules(velocity(max_count=1))
    subjects = {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE}
    allowed = risk.Lists.of(1, [entry(Kind.DEVICE, DEVICE.index, ListName.ALLOW)])
    assert risk.counts_needed(rs, allowed, Action.CLAIM, subjects, NOW) == ()
    assert judge(rs, subjects, {"device-claims": 50}, lists=allowed).outcome is Outcome.ALLOW
    both = risk.Lists.of(
        2,
        [
            entry(Kind.DEVICE, DEVICE.index, ListName.ALLOW, entry_id="rle-allow"),
            entry(Kind.DEVICE, DEVICE.index, ListName.BLOCK, entry_id="rle-block"),
        ],
    )
    verdict = judge(rs, subjects, lists=both)
    assert (verdict.outcome, verdict.entry_id) == (Outcome.BLOCK, "rle-block")


def test_a_person_on_the_allow_list_is_exempt_from_every_rule() -> None:
    rs = rules(velocity(max_count=1), cluster(max_persons=1, verdict="block"))
    lists = risk.Lists.of(1, [entry(Kind.PERSON, PERSON.index, ListName.ALLOW)])
    subjects = {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE, Kind.ADDRESS: ADDRESS}
    assert risk.counts_needed(rs, lists, Action.CLAIM, subjects, NOW) == ()
    assert judge(rs, subjects, lists=lists).outcome is Outcome.ALLOW


def test_person_of_is_the_consumer_for_now() -> None:
    assert risk.person_of("c-123") == "c-123"


# -- the rule-set document -------------------------------------------------------------------


def test_a_rule_set_document_round_trips_through_its_message() -> None:
    rs = rules(velocity(), cluster())
    message = rule_set_message(rs)
    assert rule_set_of(message, 7) == rs
    assert rule_set_document(message) == {"rules": [velocity(), cluster()]}


@pytest.mark.parametrize(
    ("doc", "reason", "path"),
    [
        ({"rules": [velocity(kind="geofence")]}, "UNKNOWN_RULE_KIND", "rule_set.rules[0].kind"),
        (
            {"rules": [velocity(max_persons=3)]},
            "UNKNOWN_RULE_FIELD",
            "rule_set.rules[0].max_persons",
        ),
        ({"rules": [], "extra": 1}, "UNKNOWN_RULE_FIELD", "rule_set.extra"),
        (
            {"rules": [velocity(str(i)) for i in range(risk.MAX_RULES + 1)]},
            "RULE_SET_TOO_LARGE",
            "rule_set.rules",
        ),
        ({"rules": [velocity(), velocity()]}, "DUPLICATE_RULE_ID", "rule_set.rules[1].rule_id"),
        ({"rules": [velocity(max_count=0)]}, "INVALID_RULE", "rule_set.rules[0].max_count"),
        ({"rules": [velocity(max_count=True)]}, "INVALID_RULE", "rule_set.rules[0].max_count"),
        (
            {"rules": [velocity(window_s=risk.MAX_WINDOW_S + 1)]},
            "INVALID_RULE",
            "rule_set.rules[0].window_s",
        ),
        ({"rules": [velocity(subject="phone")]}, "INVALID_RULE", "rule_set.rules[0].subject"),
        ({"rules": [velocity(verdict="allow")]}, "INVALID_RULE", "rule_set.rules[0].verdict"),
        ({"rules": [velocity(action="pay")]}, "INVALID_RULE", "rule_set.rules[0].action"),
        ({"rules": [velocity(rule_id="Bad Id")]}, "INVALID_RULE", "rule_set.rules[0].rule_id"),
        ({"rules": [{"kind": "velocity"}]}, "INVALID_RULE", "rule_set.rules[0].rule_id"),
        (
            {"rules": [cluster(max_persons=risk.MAX_PERSONS + 1)]},
            "INVALID_RULE",
            "rule_set.rules[0].max_persons",
        ),
        ({"rules": ["velocity"]}, "INVALID_RULE", "rule_set.rules[0]"),
    ],
)
def test_a_rule_document_is_checked_strictly(doc: Any, reason: str, path: str) -> None:
    with pytest.raises(risk.RuleSetError) as caught:
        risk.parse_rule_set(doc)
    assert (caught.value.reason, caught.value.path) == (reason, path)


def test_an_oversized_document_is_refused_by_size() -> None:
    risk.check_document_size(risk.MAX_RULE_SET_BYTES)
    with pytest.raises(risk.RuleSetError) as caught:
        risk.check_document_size(risk.MAX_RULE_SET_BYTES + 1)
    assert caught.value.reason == "RULE_SET_TOO_LARGE"


def test_an_empty_rule_set_is_valid_and_allows_everything() -> None:
    assert judge(rules(), {Kind.DEVICE: DEVICE}).outcome is Outcome.ALLOW


# -- what a decision records -----------------------------------------------------------------


def test_a_decision_event_carries_the_rule_version_and_masked_inputs_only() -> None:
    verdict = judge(
        rules(velocity(max_count=1)),
        {Kind.PERSON: PERSON, Kind.DEVICE: DEVICE},
        {"device-claims": 1},
    )
    event = decision_recorded(verdict, "rd-1", Action.CLAIM, "c-alice", "q-1")
    assert (event.outcome, event.rule_id, event.rule_set_version, event.subject_kind) == (
        "block",
        "device-claims",
        7,
        "device",
    )
    assert event.inputs["circumstances.device_id"] == "ab***yz"
    assert (event.subject_index, event.window_s) == ("idx-device-1", 3600)


def test_a_list_entry_round_trips_through_its_message() -> None:
    e = entry(Kind.MERCHANT, "m-1")
    assert entry_of(entry_message(e, "fake sales")) == e
