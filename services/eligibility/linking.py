"""Same user, pure: which consumers are one person, and the decisions that link and erase them.

Shenzhen's rule (../shared/domain.md, "Same user"): accounts that share any of ID number,
registered phone, bank-reserved phone, bank card number, device or app account are one user for
every limit, across every platform and channel. Sharing is transitive: A shares a device with
B and B a card with C, so A, B and C are one person.

Each identifier is kept only as a blind index (a keyed HMAC; see services/kernel/vault.py) in
an **identifier space**, the HMAC's purpose. Two identifiers are "the same" when their space and
index are. The spaces are chosen so that what the rule calls one thing is one space:

- a **registered phone** and a **bank-reserved phone** are one space (``phone``): a number that
  is one consumer's registered phone and another's bank phone links them, as the rule lists
  both phones as one kind of evidence;
- an **app account** is the platform's own account id, so its space is per platform: the same
  string at two platforms is two accounts (the index is taken over ``platform:account``);
- a **device id** is one space across platforms (an OS-level id reported by two platforms is one
  device);
- ID number and bank card are each their own space.

A person's id is derived from its consumers (``p-`` and the smallest consumer id's suffix), so
a merge gives a stable, replayable id. A link merges histories for future decisions; past
events are never rewritten, and a ``ConsumersLinked`` event records the identifier's kind and
mask (never the value) and what the merged person already held.

No I/O, no clock: the time arrives in the command.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from google.protobuf.message import Message

from services.kernel.contract import circumstances, personal_data
from services.kernel.errors import FailedPrecondition, NotFound
from subsidy.v1 import events_pb2 as ev


class Kind(StrEnum):
    """What an identifier is, as events and explanations name it."""

    ID_NUMBER = "ID_NUMBER"
    PHONE = "PHONE"  # the registered phone (one of the three factors)
    BANK_PHONE = "BANK_PHONE"
    BANK_CARD = "BANK_CARD"
    DEVICE = "DEVICE"
    APP_ACCOUNT = "APP_ACCOUNT"


# The blind-index purpose (identifier space) of each kind. "id_number" and "phone" are the
# purposes registration has always used, so existing indexes stay valid.
SPACES: Final[Mapping[Kind, str]] = {
    Kind.ID_NUMBER: "id_number",
    Kind.PHONE: "phone",
    Kind.BANK_PHONE: "phone",
    Kind.BANK_CARD: "bank_card",
    Kind.DEVICE: "device_id",
    Kind.APP_ACCOUNT: "app_account",
}


def space(kind: Kind) -> str:
    """The identifier space (blind-index purpose) of ``kind``."""
    return SPACES[kind]


def indexed_value(kind: Kind, value: str, platform_id: str) -> str:
    """What the blind index of a canonical ``value`` is taken over: an app account is one
    platform's, so it is qualified by the platform; anything else is the value itself."""
    return f"{platform_id}:{value}" if kind is Kind.APP_ACCOUNT else value


def mask(kind: Kind, value: str) -> str:
    """What an operator may see of a canonical identifier (the contract's masks)."""
    if kind is Kind.ID_NUMBER:
        return personal_data.mask_id_number(value)
    if kind in (Kind.PHONE, Kind.BANK_PHONE):
        return personal_data.mask_phone(value)
    if kind is Kind.BANK_CARD:
        return circumstances.mask_bank_card(value)
    return circumstances.mask_token(value)


@dataclass(frozen=True)
class Identifier:
    """One identifier as it is kept: kind, blind index in the kind's space, and mask."""

    kind: Kind
    index: str
    masked: str

    @property
    def key(self) -> tuple[str, str]:
        """What two identifiers must share to be the same: space and index."""
        return (space(self.kind), self.index)


# --------------------------------------------------------------------------------------------
# Who is one person


def person_id(consumers: Iterable[str]) -> str:
    """The id of the person made of ``consumers``: derived from the smallest consumer id, so a
    replay of the same links gives the same id."""
    first = min(consumers)
    return f"p-{first.removeprefix('c-')}"


def persons(held: Mapping[str, Iterable[tuple[str, str]]]) -> dict[str, str]:
    """Every consumer's person, given each consumer's identifier keys (space, index): consumers
    that share a key, directly or through a chain of others, are one person (union-find)."""
    parent: dict[str, str] = {c: c for c in held}

    def root(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    first_holder: dict[tuple[str, str], str] = {}
    for consumer in sorted(held):
        for key in held[consumer]:
            other = first_holder.setdefault(key, consumer)
            a, b = root(consumer), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for consumer in held:
        members.setdefault(root(consumer), []).append(consumer)
    return {c: person_id(group) for group in members.values() for c in group}


# --------------------------------------------------------------------------------------------
# Linking: a consumer's identifiers are recorded, and persons that share one merge


@dataclass(frozen=True)
class Holder:
    """Another consumer holding an identifier the command names, and their person now."""

    consumer_id: str
    person_id: str
    kind: Kind
    key: tuple[str, str]


@dataclass(frozen=True)
class LinkState:
    """What linking is decided on, read under the consumer's stream lock, the identifiers'
    locks and the locks of every person involved."""

    registered: bool  # registered, and enrolled with the platform the command comes through
    erased: bool
    person_id: str  # the consumer's person
    known: frozenset[tuple[str, str, Kind]]  # the consumer's identifiers: (space, index, kind)
    holders: tuple[Holder, ...]  # other consumers holding the command's identifiers
    # Per person involved: what its consumers hold that counts against each category's limit.
    held: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Identify:
    """Record ``identifiers`` for a consumer (through ``platform_id``) and link them."""

    consumer_id: str
    platform_id: str
    identifiers: tuple[Identifier, ...]
    now: dt.datetime


def unknown_consumer() -> NotFound:
    return NotFound("UNKNOWN_CONSUMER", "consumer_id: not registered", field="consumer_id")


def consumer_erased() -> FailedPrecondition:
    return FailedPrecondition(
        "CONSUMER_ERASED", "consumer_id: this consumer's data was erased", field="consumer_id"
    )


def identify(state: LinkState | None, cmd: Identify) -> list[Message]:
    """The identifiers the consumer did not have yet (``IdentifiersAdded``), then one
    ``ConsumersLinked`` per other person that shares one of them, in the command's order; each
    merge is with the person as the previous merges left it."""
    if state is None or not state.registered:
        raise unknown_consumer()
    if state.erased:
        raise consumer_erased()
    events: list[Message] = []
    new: list[Identifier] = []
    seen: set[tuple[str, str, Kind]] = set(state.known)
    for ident in cmd.identifiers:
        mark = (*ident.key, ident.kind)
        if mark not in seen:
            seen.add(mark)
            new.append(ident)
    if new:
        events.append(
            ev.IdentifiersAdded(
                consumer_id=cmd.consumer_id,
                platform_id=cmd.platform_id,
                identifiers=[
                    ev.IdentifierIndex(kind=i.kind, blind_index=i.index, masked=i.masked)
                    for i in new
                ],
            )
        )
    # Persons as the merges so far leave them: person id -> its consumers and held counts.
    members = {p: set(m) for p, m in state.members.items()}
    members.setdefault(state.person_id, {cmd.consumer_id})
    held: dict[str, dict[str, int]] = {p: dict(h) for p, h in state.held.items()}
    mine = state.person_id
    current: dict[str, str] = {}  # an absorbed person -> the person it became
    for ident in cmd.identifiers:
        for holder in state.holders:
            if holder.key != ident.key:
                continue
            theirs = holder.person_id
            while theirs in current:
                theirs = current[theirs]
            if theirs == mine:
                continue
            merged = members.get(mine, set()) | members.get(theirs, {holder.consumer_id})
            new_id = person_id(merged)
            counts = _add(held.get(mine, {}), held.get(theirs, {}))
            events.append(
                ev.ConsumersLinked(
                    person_id=new_id,
                    merged_person_ids=sorted({mine, theirs}),
                    consumer_id=cmd.consumer_id,
                    kind=ident.kind,
                    linked_consumer_id=holder.consumer_id,
                    linked_kind=holder.kind,
                    masked=ident.masked,
                    held=[
                        ev.CategoryCount(category=c, count=n)
                        for c, n in sorted(counts.items())
                        if n > 0
                    ],
                )
            )
            for old in (mine, theirs):
                if old != new_id:
                    current[old] = new_id
            members[new_id], held[new_id], mine = merged, counts, new_id
    return events


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {c: a.get(c, 0) + b.get(c, 0) for c in a.keys() | b.keys()}


def allowed_held(limit: int, held_when_linked: int) -> int:
    """The most a person may hold of a category: the limit, or what its consumers already held
    together when they were last linked (claims made before the link are not taken back, and
    no claim is allowed while the person holds the limit or more)."""
    return max(limit, held_when_linked)


# --------------------------------------------------------------------------------------------
# Erasure


@dataclass(frozen=True)
class Erase:
    consumer_id: str
    reason: str


@dataclass(frozen=True)
class ErasureState:
    registered: bool
    erased: bool


def erase(state: ErasureState | None, cmd: Erase) -> list[Message]:
    """Erase a registered consumer once: the event the key's destruction is recorded by."""
    if state is None or not state.registered:
        raise unknown_consumer()
    if state.erased:
        raise consumer_erased()
    return [ev.ConsumerErased(consumer_id=cmd.consumer_id, reason=cmd.reason)]


# --------------------------------------------------------------------------------------------
# Explanation


@dataclass(frozen=True)
class Held:
    """One consumer's identifier, as the persons read model keeps it."""

    consumer_id: str
    kind: Kind
    key: tuple[str, str]
    masked: str


@dataclass(frozen=True)
class Link:
    """``consumer_id`` holds an identifier as ``kind`` that ``linked_consumer_id`` holds as
    ``linked_kind``."""

    consumer_id: str
    kind: Kind
    linked_consumer_id: str
    linked_kind: Kind
    masked: str


def links(identifiers: Sequence[Held]) -> list[Link]:
    """Every link among one person's identifiers: for each identifier held by more than one of
    its consumers, the first holder (smallest consumer id) with each other holder."""
    by_key: dict[tuple[str, str], list[Held]] = {}
    for held in sorted(identifiers, key=lambda h: (h.consumer_id, h.kind)):
        by_key.setdefault(held.key, []).append(held)
    found: list[Link] = []
    for key in sorted(by_key):
        holders = by_key[key]
        first = holders[0]
        masked = next((h.masked for h in holders if h.masked), "")
        for other in holders[1:]:
            if other.consumer_id != first.consumer_id:
                found.append(
                    Link(first.consumer_id, first.kind, other.consumer_id, other.kind, masked)
                )
    return found
