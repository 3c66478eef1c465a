"""Same user (services/eligibility/linking.py), read like ../shared/domain.md: accounts that
share any identifier, directly or through a chain, are one person for every limit; accounts
that share none are not.

Pure: no database. The persons projection's SQL does what :class:`Model` does here (apply the
decision's events); tests/e2e/test_same_user.py checks the real thing over gRPC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from services.eligibility import domain, linking
from services.eligibility.linking import Identifier, Kind
from services.invariants import InvariantViolation, check_person_limits
from services.kernel.contract.policy import Policy, default_policy
from services.kernel.errors import FailedPrecondition, NotFound, ResourceExhausted
from subsidy.v1 import events_pb2 as ev

POLICY: Policy = default_policy()
PHONE_RULE = next(c for c in POLICY.categories if c.code == "phone")
NOW = dt.datetime(2025, 6, 1, 2, 30, tzinfo=dt.UTC)
CONSUMERS = [f"c-{i:02d}" for i in range(7)]
KINDS = {"phone": Kind.BANK_PHONE, "device_id": Kind.DEVICE, "bank_card": Kind.BANK_CARD}

Key = tuple[str, str]
keys = st.tuples(st.sampled_from(sorted(KINDS)), st.sampled_from("abcdefgh"))
assignments = st.dictionaries(
    st.sampled_from(CONSUMERS), st.frozensets(keys, max_size=3), min_size=1
)


def connected(held: Mapping[str, Iterable[Key]]) -> dict[str, set[str]]:
    """A second, naive reading of the rule: each consumer's set of consumers reachable through
    chains of shared identifiers (breadth first)."""
    sets = {c: set(ks) for c, ks in held.items()}
    reach: dict[str, set[str]] = {}
    for start in sets:
        seen, frontier = {start}, [start]
        while frontier:
            c = frontier.pop()
            for other, ks in sets.items():
                if other not in seen and ks & sets[c]:
                    seen.add(other)
                    frontier.append(other)
        reach[start] = seen
    return reach


@given(assignments)
def test_any_chain_of_shared_identifiers_makes_one_person_and_nothing_else_does(
    held: dict[str, frozenset[Key]],
) -> None:
    person = linking.persons(held)
    reach = connected(held)
    for a in held:
        for b in held:
            assert (person[a] == person[b]) == (b in reach[a]), (a, b)
        assert person[a] == linking.person_id(reach[a])


def identifier(key: Key) -> Identifier:
    space, value = key
    kind = KINDS[space]
    assert linking.space(kind) == space
    return Identifier(kind, f"idx-{value}", f"mask-{value}")


@dataclass
class Model:
    """The persons read model as the projection keeps it, fed by the decisions' events."""

    known: dict[str, set[tuple[str, str, Kind]]] = field(default_factory=dict)
    person_of: dict[str, str] = field(default_factory=dict)
    held_when_linked: dict[str, dict[str, int]] = field(default_factory=dict)
    phones: dict[str, int] = field(default_factory=dict)  # qualifications held per consumer

    def register(self, consumer: str) -> None:
        if consumer not in self.person_of:
            self.person_of[consumer] = linking.person_id([consumer])
            self.known[consumer] = set()
            self.phones[consumer] = 0

    def members(self, person: str) -> frozenset[str]:
        return frozenset(c for c, p in self.person_of.items() if p == person)

    def held(self, person: str) -> int:
        return sum(self.phones[c] for c in self.members(person))

    def state(self, consumer: str, ids: tuple[Identifier, ...]) -> linking.LinkState:
        wanted = {i.key for i in ids}
        holders = tuple(
            linking.Holder(other, self.person_of[other], kind, (space, index))
            for other in sorted(self.known)
            if other != consumer
            for space, index, kind in sorted(self.known[other])
            if (space, index) in wanted
        )
        involved = {self.person_of[consumer], *(h.person_id for h in holders)}
        return linking.LinkState(
            registered=True,
            erased=False,
            person_id=self.person_of[consumer],
            known=frozenset(self.known[consumer]),
            holders=holders,
            held={p: {"phone": self.held(p)} for p in involved},
            members={p: self.members(p) for p in involved},
        )

    def identify(self, consumer: str, ids: tuple[Identifier, ...]) -> list[Message]:
        self.register(consumer)
        events = linking.identify(
            self.state(consumer, ids), linking.Identify(consumer, "jd", ids, NOW)
        )
        for event in events:
            if isinstance(event, ev.IdentifiersAdded):
                self.known[consumer] |= {
                    (linking.space(Kind(i.kind)), i.blind_index, Kind(i.kind))
                    for i in event.identifiers
                }
            elif isinstance(event, ev.ConsumersLinked):
                merged = set(event.merged_person_ids)
                # Two persons that exist now, and what the link records is what they hold.
                assert len(merged) == 2 and merged <= set(self.person_of.values())
                becoming = {c for c, p in self.person_of.items() if p in merged}
                assert event.person_id == linking.person_id(becoming)
                phones = sum(self.phones[c] for c in becoming)
                assert [(h.category, h.count) for h in event.held] == (
                    [("phone", phones)] if phones else []
                )
                for c in becoming:
                    self.person_of[c] = event.person_id
                for p in merged:
                    self.held_when_linked.pop(p, None)
                self.held_when_linked[event.person_id] = {h.category: h.count for h in event.held}
        return events

    def claim(self, consumer: str) -> bool:
        """A claim of one phone, decided by the claim rule on the person's count."""
        self.register(consumer)
        used = domain.Qualification("q", consumer, "phone", "jd", domain.USED, "o", "", NOW)
        state = domain.ClaimState(True, (used,) * self.held(self.person_of[consumer]), 0)
        try:
            domain.claim(state, domain.Claim(consumer, "phone", "jd", "q", NOW, "440310"), POLICY)
        except ResourceExhausted:
            return False
        self.phones[consumer] += 1
        return True


steps = st.lists(
    st.tuples(st.sampled_from(CONSUMERS), st.frozensets(keys, min_size=1, max_size=3)),
    min_size=1,
    max_size=12,
)


@given(steps)
def test_linking_one_identification_at_a_time_gives_the_same_persons(
    history: list[tuple[str, frozenset[Key]]],
) -> None:
    """Identifications arriving one by one, each decided on the read model the previous ones
    left, end in the persons the rule gives for everything known; repeating one changes
    nothing."""
    model = Model()
    everything: dict[str, set[Key]] = {}
    for consumer, given_keys in history:
        model.identify(consumer, tuple(identifier(k) for k in sorted(given_keys)))
        everything.setdefault(consumer, set()).update(given_keys)
    assert model.person_of == linking.persons(everything)
    consumer, given_keys = history[-1]
    assert model.identify(consumer, tuple(identifier(k) for k in sorted(given_keys))) == []


@given(steps, st.permutations(CONSUMERS))
def test_linked_consumers_share_one_limit_and_unlinked_ones_do_not(
    history: list[tuple[str, frozenset[Key]]], order: list[str]
) -> None:
    """Linked first, then every consumer claims a phone (one per person): exactly one claim
    per person succeeds, so any chain merges the limit and no unshared pair is merged."""
    model = Model()
    for consumer, given_keys in history:
        model.identify(consumer, tuple(identifier(k) for k in sorted(given_keys)))
    for consumer in CONSUMERS:
        model.register(consumer)
    granted = [c for c in order if model.claim(c)]
    persons_now = {model.person_of[c] for c in CONSUMERS}
    assert len(granted) == len(persons_now) * PHONE_RULE.per_person_limit
    assert len({model.person_of[c] for c in granted}) == len(granted)


actions = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.sampled_from(CONSUMERS), st.just(frozenset[Key]())),
        st.tuples(
            st.just("identify"),
            st.sampled_from(CONSUMERS),
            st.frozensets(keys, min_size=1, max_size=2),
        ),
    ),
    max_size=25,
)


@given(actions)
def test_claims_before_a_link_are_kept_and_none_is_allowed_above_the_limit_after_it(
    history: list[tuple[str, str, frozenset[Key]]],
) -> None:
    """Claims and links in any order: a link never takes back a claim made before it (the
    link records what the person held), and the per-person invariant, counting linked
    consumers together, holds after every step."""
    model = Model()
    for action, consumer, given_keys in history:
        if action == "claim":
            before = model.held(model.person_of.get(consumer, linking.person_id([consumer])))
            granted = model.claim(consumer)
            assert granted == (before < PHONE_RULE.per_person_limit)
        else:
            model.identify(consumer, tuple(identifier(k) for k in sorted(given_keys)))
        check_person_limits(
            {(c, "phone"): n for c, n in model.phones.items()},
            model.person_of,
            lambda _: PHONE_RULE.per_person_limit,
            {(p, c): n for p, h in model.held_when_linked.items() for c, n in h.items()},
        )


def test_the_invariant_counts_linked_consumers_as_one_person() -> None:
    """Two consumers of one person holding a phone each, with no link that recorded both:
    the per-person invariant fails (per consumer, each would be within the limit)."""
    held = {("c-01", "phone"): 1, ("c-02", "phone"): 1}
    check_person_limits(held, {}, lambda _: 1)  # two persons: fine
    with pytest.raises(InvariantViolation):
        check_person_limits(held, {"c-01": "p-01", "c-02": "p-01"}, lambda _: 1)
    # Linked after both had claimed: what they held is what the link recorded.
    check_person_limits(held, {"c-01": "p-01", "c-02": "p-01"}, lambda _: 1, {("p-01", "phone"): 2})


# -- the shapes of things -------------------------------------------------------------------


def test_a_registered_phone_and_a_bank_phone_are_one_identifier_space() -> None:
    assert linking.space(Kind.PHONE) == linking.space(Kind.BANK_PHONE) == "phone"
    assert len({linking.space(k) for k in Kind}) == len(Kind) - 1


def test_an_app_account_is_one_platforms_and_a_device_is_everyones() -> None:
    assert linking.indexed_value(Kind.APP_ACCOUNT, "u123", "jd") != linking.indexed_value(
        Kind.APP_ACCOUNT, "u123", "taobao"
    )
    assert linking.indexed_value(Kind.DEVICE, "dev-1234", "jd") == linking.indexed_value(
        Kind.DEVICE, "dev-1234", "taobao"
    )


def test_masks_hide_the_value() -> None:
    assert linking.mask(Kind.BANK_CARD, "6222020200112233445") == "****3445"
    assert linking.mask(Kind.BANK_PHONE, "13812345678") == "138****5678"
    assert linking.mask(Kind.DEVICE, "ABCDEF123456") == "AB***56"


def test_a_link_event_names_kinds_and_mask_and_what_the_person_held() -> None:
    model = Model()
    model.identify("c-01", (identifier(("device_id", "a")),))
    model.claim("c-01")
    model.identify("c-02", (identifier(("bank_card", "b")),))
    model.claim("c-02")
    events = model.identify("c-02", (identifier(("device_id", "a")),))
    assert [type(e) for e in events] == [ev.IdentifiersAdded, ev.ConsumersLinked]
    link = events[1]
    assert isinstance(link, ev.ConsumersLinked)
    assert (link.consumer_id, link.kind, link.linked_consumer_id, link.linked_kind) == (
        "c-02",
        "DEVICE",
        "c-01",
        "DEVICE",
    )
    assert (link.masked, link.person_id, list(link.merged_person_ids)) == (
        "mask-a",
        "p-01",
        ["p-01", "p-02"],
    )
    assert [(h.category, h.count) for h in link.held] == [("phone", 2)]
    assert not model.claim("c-01") and not model.claim("c-02")


def test_an_unknown_or_erased_consumer_is_refused() -> None:
    cmd = linking.Identify("c-01", "jd", (identifier(("device_id", "a")),), NOW)
    with pytest.raises(NotFound) as unknown:
        linking.identify(linking.LinkState(False, False, "", frozenset(), ()), cmd)
    assert unknown.value.reason == "UNKNOWN_CONSUMER"
    with pytest.raises(FailedPrecondition) as erased:
        linking.identify(linking.LinkState(True, True, "p-01", frozenset(), ()), cmd)
    assert erased.value.reason == "CONSUMER_ERASED"


def test_a_consumer_is_erased_once() -> None:
    [event] = linking.erase(linking.ErasureState(True, False), linking.Erase("c-01", "ended"))
    assert isinstance(event, ev.ConsumerErased)
    assert (event.consumer_id, event.reason) == ("c-01", "ended")
    with pytest.raises(FailedPrecondition) as again:
        linking.erase(linking.ErasureState(True, True), linking.Erase("c-01", "ended"))
    assert again.value.reason == "CONSUMER_ERASED"
    with pytest.raises(NotFound):
        linking.erase(linking.ErasureState(False, False), linking.Erase("c-01", "ended"))


def test_explained_links_pair_the_first_holder_with_each_other() -> None:
    key = ("device_id", "idx")
    found = linking.links(
        [
            linking.Held("c-03", Kind.DEVICE, key, "de***42"),
            linking.Held("c-01", Kind.DEVICE, key, "de***42"),
            linking.Held("c-02", Kind.DEVICE, key, ""),  # erased: its mask is gone
            linking.Held("c-01", Kind.PHONE, ("phone", "p1"), "138****5678"),
        ]
    )
    assert [(lk.consumer_id, lk.linked_consumer_id, lk.masked) for lk in found] == [
        ("c-01", "c-02", "de***42"),
        ("c-01", "c-03", "de***42"),
    ]
