"""The real-time risk engine, pure: a versioned rule set and block/allow lists as data, and the
verdict they give a claim or a reservation. No I/O, no clock: eligibility (claims) and the ledger
(reservations) each evaluate it in-process, on counts of their own recorded observations.

Rules (``rules`` of a rule-set document, every limit and window is data):

- ``velocity``: at most ``max_count`` earlier claims (``action: claim``) or reservations
  (``action: reserve``) from one ``subject`` (``device``, ``address``, ``ip``, ``card``) within
  ``window_s`` seconds; the next one gets the rule's ``verdict``.
- ``address_cluster``: at most ``max_persons`` distinct persons delivering to one normalised
  address within ``window_s``; the next person gets the ``verdict``.
- ``verdict``: ``block`` refuses, ``flag`` lets it through and records the decision.

Lists: an entry on the block list (``person``, ``device``, ``address``, ``merchant``,
``serial``) blocks every claim and reservation that names its subject until it expires. An entry
on the allow list exempts its subject from the rules (a person on it: from every rule); it never
overrides a block entry. Subjects arrive as blind indexes (device, address, IP, card) or
pseudonymous ids (person, merchant, serial) with masked forms; nothing here sees a raw value.

Evaluation: :func:`counts_needed` says which observation counts the rules need for one
attempt, the service counts them, and :func:`evaluate` gives the verdict: a block entry first,
then the rules in their order, a block hit before a flag hit.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final


class Action(StrEnum):
    CLAIM = "claim"
    RESERVE = "reserve"


class Outcome(StrEnum):
    ALLOW = "allow"
    FLAG = "flag"
    BLOCK = "block"


class Kind(StrEnum):
    """What a subject is: who, from where, paying how, for what."""

    PERSON = "person"
    DEVICE = "device"
    IP = "ip"
    ADDRESS = "address"
    CARD = "card"
    MERCHANT = "merchant"
    SERIAL = "serial"


class ListName(StrEnum):
    BLOCK = "block"
    ALLOW = "allow"


VELOCITY: Final = "velocity"
ADDRESS_CLUSTER: Final = "address_cluster"
RULE_KINDS: Final = (VELOCITY, ADDRESS_CLUSTER)
VELOCITY_SUBJECTS: Final = (Kind.DEVICE, Kind.ADDRESS, Kind.IP, Kind.CARD)
LIST_KINDS: Final = (Kind.PERSON, Kind.DEVICE, Kind.ADDRESS, Kind.MERCHANT, Kind.SERIAL)
# The request field each subject comes from: what a refusal names, never the value.
FIELDS: Final[Mapping[Kind, str]] = {
    Kind.PERSON: "consumer_id",
    Kind.DEVICE: "circumstances.device_id",
    Kind.IP: "circumstances.ip",
    Kind.ADDRESS: "circumstances.delivery_address",
    Kind.CARD: "circumstances.bank_card",
    Kind.MERCHANT: "merchant_id",
    Kind.SERIAL: "serial",
}

# Bounds of a rule-set document, checked at the edge (the limits themselves are data).
MAX_RULES: Final = 64
MAX_RULE_SET_BYTES: Final = 16 * 1024
MAX_WINDOW_S: Final = 31 * 24 * 3600
MAX_COUNT: Final = 1_000_000
MAX_PERSONS: Final = 10_000
MAX_LIST_DAYS: Final = 366
_RULE_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_COMMON_KEYS: Final = ("rule_id", "kind", "action", "window_s", "verdict")
_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    VELOCITY: (*_COMMON_KEYS, "subject", "max_count"),
    ADDRESS_CLUSTER: (*_COMMON_KEYS, "max_persons"),
}


def person_of(consumer_id: str) -> str:
    """The person a consumer is, for every risk rule and list: today the consumer id itself.
    The one place that says so; same-user linking replaces it with the linked person's id."""
    return consumer_id


# --------------------------------------------------------------------------------------------
# The rule set


class RuleSetError(ValueError):
    """A rule-set document that is not valid: a reason code and the offending field path."""

    def __init__(self, reason: str, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class Rule:
    """One rule; ``limit`` is ``max_count`` (velocity) or ``max_persons`` (address_cluster)."""

    rule_id: str
    kind: str
    action: Action
    subject: Kind
    window_s: int
    limit: int
    verdict: Outcome

    @property
    def window(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.window_s)


@dataclass(frozen=True)
class RuleSet:
    """The active rules and their version (0: none was ever approved)."""

    version: int = 0
    rules: tuple[Rule, ...] = ()

    def of(self, action: Action) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.action is action)


def _choice(path: str, value: Any, allowed: Sequence[str], reason: str = "INVALID_RULE") -> str:
    if not isinstance(value, str) or value not in allowed:
        raise RuleSetError(reason, path, f"one of {', '.join(allowed)}")
    return value


def _bounded(path: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python: "max_count: true" is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RuleSetError("INVALID_RULE", path, f"a whole number in {low}..{high}")
    return value


def parse_rule(doc: Any, path: str) -> Rule:
    """One rule of a document, checked strictly: its kind's keys, no others, every value
    bounded."""
    if not isinstance(doc, Mapping):
        raise RuleSetError("INVALID_RULE", path, "a rule is a mapping")
    kind = _choice(f"{path}.kind", doc.get("kind"), RULE_KINDS, "UNKNOWN_RULE_KIND")
    allowed = _KEYS[kind]
    for key in doc:
        if key not in allowed:
            raise RuleSetError(
                "UNKNOWN_RULE_FIELD", f"{path}.{key}", f"not a field of a {kind} rule"
            )
    for key in allowed:
        if key not in doc:
            raise RuleSetError("INVALID_RULE", f"{path}.{key}", "required")
    rule_id = doc["rule_id"]
    if not isinstance(rule_id, str) or not _RULE_ID_RE.fullmatch(rule_id):
        raise RuleSetError(
            "INVALID_RULE", f"{path}.rule_id", "lower-case letters, digits and . _ -, at most 64"
        )
    action = Action(_choice(f"{path}.action", doc["action"], tuple(Action)))
    window_s = _bounded(f"{path}.window_s", doc["window_s"], 1, MAX_WINDOW_S)
    verdict = Outcome(_choice(f"{path}.verdict", doc["verdict"], (Outcome.BLOCK, Outcome.FLAG)))
    if kind == VELOCITY:
        subject = Kind(_choice(f"{path}.subject", doc["subject"], VELOCITY_SUBJECTS))
        limit = _bounded(f"{path}.max_count", doc["max_count"], 1, MAX_COUNT)
    else:
        subject = Kind.ADDRESS
        limit = _bounded(f"{path}.max_persons", doc["max_persons"], 1, MAX_PERSONS)
    return Rule(rule_id, kind, action, subject, window_s, limit, verdict)


def parse_rule_set(doc: Any, version: int = 0) -> RuleSet:
    """A rule-set document (``{"rules": [...]}``) as a :class:`RuleSet`, or RuleSetError."""
    if not isinstance(doc, Mapping):
        raise RuleSetError("INVALID_RULE", "rule_set", "a mapping with rules")
    for key in doc:
        if key != "rules":
            raise RuleSetError("UNKNOWN_RULE_FIELD", f"rule_set.{key}", "not a rule-set field")
    rules = doc.get("rules", [])
    if not isinstance(rules, list | tuple):
        raise RuleSetError("INVALID_RULE", "rule_set.rules", "a list of rules")
    if len(rules) > MAX_RULES:
        raise RuleSetError("RULE_SET_TOO_LARGE", "rule_set.rules", f"at most {MAX_RULES} rules")
    parsed = tuple(parse_rule(r, f"rule_set.rules[{i}]") for i, r in enumerate(rules))
    seen: set[str] = set()
    for i, rule in enumerate(parsed):
        if rule.rule_id in seen:
            raise RuleSetError(
                "DUPLICATE_RULE_ID", f"rule_set.rules[{i}].rule_id", "used by an earlier rule"
            )
        seen.add(rule.rule_id)
    return RuleSet(version, parsed)


def check_document_size(size: int) -> None:
    """A rule-set document's serialised size is bounded (what an event may carry)."""
    if size > MAX_RULE_SET_BYTES:
        raise RuleSetError(
            "RULE_SET_TOO_LARGE", "rule_set", f"{size} bytes, at most {MAX_RULE_SET_BYTES}"
        )


def rule_document(rule: Rule) -> dict[str, Any]:
    """A rule as the document people write (the inverse of :func:`parse_rule`)."""
    doc: dict[str, Any] = {
        "rule_id": rule.rule_id,
        "kind": rule.kind,
        "action": str(rule.action),
        "window_s": rule.window_s,
        "verdict": str(rule.verdict),
    }
    if rule.kind == VELOCITY:
        doc |= {"subject": str(rule.subject), "max_count": rule.limit}
    else:
        doc["max_persons"] = rule.limit
    return doc


# --------------------------------------------------------------------------------------------
# Lists


@dataclass(frozen=True)
class ListEntry:
    entry_id: str
    list: ListName
    kind: Kind
    index: str  # blind index (device, address) or id (person, merchant, serial)
    masked: str
    expires_at: dt.datetime

    def live(self, now: dt.datetime) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class Lists:
    """The list entries in force, looked up by (list, kind, index)."""

    version: int = 0
    entries: Mapping[tuple[ListName, Kind, str], tuple[ListEntry, ...]] = field(
        default_factory=dict
    )

    @classmethod
    def of(cls, version: int, entries: Iterable[ListEntry]) -> Lists:
        grouped: dict[tuple[ListName, Kind, str], tuple[ListEntry, ...]] = {}
        for e in entries:
            key = (e.list, e.kind, e.index)
            grouped[key] = (*grouped.get(key, ()), e)
        return cls(version, grouped)

    def find(self, name: ListName, subject: Subject | None, now: dt.datetime) -> ListEntry | None:
        """The live entry of list ``name`` on ``subject``, if any."""
        if subject is None:
            return None
        for e in self.entries.get((name, subject.kind, subject.index), ()):
            if e.live(now):
                return e
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Subject:
    kind: Kind
    index: str
    masked: str


Subjects = Mapping[Kind, Subject]


@dataclass(frozen=True)
class Count:
    """One count a rule needs from the service's observations: earlier ``action``s by
    ``subject`` since ``since`` (velocity), or distinct persons other than ``person`` at the
    address since ``since`` (address_cluster), counted up to ``limit`` (more never matters)."""

    rule_id: str
    kind: str
    action: Action
    subject: Subject
    since: dt.datetime
    person: str
    limit: int


@dataclass(frozen=True)
class Verdict:
    """What the rules and lists say about one attempt, and what they used (masked)."""

    outcome: Outcome
    rule_id: str = ""
    rule_set_version: int = 0
    lists_version: int = 0
    subject: Subject | None = None
    entry_id: str = ""
    window_s: int = 0
    inputs: tuple[tuple[str, str], ...] = ()

    @property
    def field(self) -> str:
        """The request field the verdict is about (never its value)."""
        return FIELDS[self.subject.kind] if self.subject is not None else ""


def _person(subjects: Subjects) -> str:
    person = subjects.get(Kind.PERSON)
    return person.index if person is not None else ""


def _applicable(
    rules: RuleSet, lists: Lists, action: Action, subjects: Subjects, now: dt.datetime
) -> list[tuple[Rule, Subject]]:
    """The rules of ``action`` whose subject is present and not exempt by the allow list."""
    if lists.find(ListName.ALLOW, subjects.get(Kind.PERSON), now) is not None:
        return []
    found = []
    for rule in rules.of(action):
        subject = subjects.get(rule.subject)
        if subject is None or lists.find(ListName.ALLOW, subject, now) is not None:
            continue
        found.append((rule, subject))
    return found


def counts_needed(
    rules: RuleSet, lists: Lists, action: Action, subjects: Subjects, now: dt.datetime
) -> tuple[Count, ...]:
    """The observation counts :func:`evaluate` needs for this attempt (none if a block entry
    decides it already)."""
    if _block_entry(lists, subjects, now) is not None:
        return ()
    person = _person(subjects)
    return tuple(
        Count(rule.rule_id, rule.kind, action, subject, now - rule.window, person, rule.limit)
        for rule, subject in _applicable(rules, lists, action, subjects, now)
    )


def _block_entry(
    lists: Lists, subjects: Subjects, now: dt.datetime
) -> tuple[ListEntry, Subject] | None:
    for kind in LIST_KINDS:
        subject = subjects.get(kind)
        entry = lists.find(ListName.BLOCK, subject, now)
        if entry is not None and subject is not None:
            return entry, subject
    return None


def evaluate(
    rules: RuleSet,
    lists: Lists,
    action: Action,
    subjects: Subjects,
    counts: Mapping[str, int],
    now: dt.datetime,
) -> Verdict:
    """The verdict on one claim or reservation. ``counts`` holds, per rule id, the count
    :func:`counts_needed` asked for. A velocity rule hits when the earlier attempts already
    reach ``max_count``; an address-cluster rule when the other persons at the address already
    reach ``max_persons`` (so this one would be one more than allowed)."""
    rv, lv = rules.version, lists.version
    blocked = _block_entry(lists, subjects, now)
    if blocked is not None:
        entry, subject = blocked
        return Verdict(
            Outcome.BLOCK,
            rule_id=f"block-list:{subject.kind}",
            subject=subject,
            entry_id=entry.entry_id,
            inputs=((FIELDS[subject.kind], subject.masked), ("entry_id", entry.entry_id)),
            rule_set_version=rv,
            lists_version=lv,
        )
    hits: list[Verdict] = []
    for rule, subject in _applicable(rules, lists, action, subjects, now):
        seen = counts.get(rule.rule_id)
        if seen is None:
            raise KeyError(f"no count for rule {rule.rule_id}: ask counts_needed first")
        if seen < rule.limit:
            continue
        limit_name = "max_count" if rule.kind == VELOCITY else "max_persons"
        counted = "count" if rule.kind == VELOCITY else "other_persons"
        hits.append(
            Verdict(
                rule.verdict,
                rule_id=rule.rule_id,
                subject=subject,
                window_s=rule.window_s,
                inputs=(
                    (FIELDS[subject.kind], subject.masked),
                    (counted, str(seen)),
                    (limit_name, str(rule.limit)),
                    ("window_s", str(rule.window_s)),
                ),
                rule_set_version=rv,
                lists_version=lv,
            )
        )
    for outcome in (Outcome.BLOCK, Outcome.FLAG):
        for hit in hits:
            if hit.outcome is outcome:
                return hit
    return Verdict(Outcome.ALLOW, rule_set_version=rv, lists_version=lv)
