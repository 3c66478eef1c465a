"""The system's invariants, each written once.

Unit tests, end-to-end tests, the chaos tests and the audit verifier call these same functions;
each raises :class:`InvariantViolation` naming what broke and returns nothing when it holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import NamedTuple


class InvariantViolation(AssertionError):
    """An invariant of architecture.md does not hold."""


def check_budget_balanced(
    pool_id: str, *, funded: int, available: int, reserved: int, spent: int
) -> None:
    """Per budget pool: funded = available + reserved + spent, available ≥ 0 (no overspend)."""
    for name, value in (
        ("funded", funded),
        ("available", available),
        ("reserved", reserved),
        ("spent", spent),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvariantViolation(f"pool {pool_id}: {name} is not integer fen: {value!r}")
        if value < 0:
            raise InvariantViolation(f"pool {pool_id}: {name} is negative ({value} fen)")
    if funded != available + reserved + spent:
        raise InvariantViolation(
            f"pool {pool_id}: funded {funded} != available {available} + reserved {reserved}"
            f" + spent {spent}"
        )


def check_sources_add_up(
    pool_id: str, pool: Mapping[str, int], sources: Iterable[Mapping[str, int]]
) -> None:
    """Per budget pool: in every bucket its funding sources together hold no more than the
    pool (exactly the pool's figures when every funding named its source; what is left is money
    of fundings that named none, and is never negative either)."""
    listed = list(sources)
    for bucket, total in pool.items():
        held = sum(s.get(bucket, 0) for s in listed)
        if held > total:
            raise InvariantViolation(
                f"pool {pool_id}: its sources hold {held} fen {bucket}, the pool {total}"
            )


def check_shards_add_up(
    pool_id: str, pool: Mapping[str, int], shards: Mapping[int, Mapping[str, int]]
) -> None:
    """Per budget pool split into shards: every shard balanced on its own (funded = available
    + reserved + spent, nothing negative: no shard overspends what it was given), and the
    pool's figures exactly the sums of its shards' (so the pool never overspends either)."""
    for shard, figures in sorted(shards.items()):
        check_budget_balanced(
            f"{pool_id} shard {shard}",
            funded=figures["funded"],
            available=figures["available"],
            reserved=figures["reserved"],
            spent=figures["spent"],
        )
    for bucket, value in pool.items():
        held = sum(f.get(bucket, 0) for f in shards.values())
        if held != value:
            raise InvariantViolation(
                f"pool {pool_id}: its shards hold {held} fen {bucket}, the pool {value}"
            )


def check_shard_moves_balance(
    pool_id: str, sent: Mapping[tuple[int, int], int], received: Mapping[tuple[int, int], int]
) -> None:
    """Per budget pool split into shards: what each shard sent another (``(from, to) -> fen``)
    is exactly what that one received: a rebalance moves money, never makes or loses it."""
    for move in sorted(sent.keys() | received.keys()):
        if sent.get(move, 0) != received.get(move, 0):
            raise InvariantViolation(
                f"pool {pool_id}: shard {move[0]} sent shard {move[1]} {sent.get(move, 0)} fen,"
                f" which received {received.get(move, 0)} fen"
            )


def check_source_parts(what: str, amount: int, parts: Iterable[tuple[str, int]]) -> None:
    """A subsidy's source parts (what each funding source holds, paid or gets back) are
    positive and add up to the subsidy."""
    found = list(parts)
    if any(fen <= 0 for _, fen in found) or sum(fen for _, fen in found) != amount:
        raise InvariantViolation(f"{what}: source parts {found} do not add up to {amount} fen")


def check_person_limit(
    person_id: str, category: str, *, held: int, limit: int, held_when_linked: int = 0
) -> None:
    """Per person (every consumer linked into it by a shared identifier) and category: the
    qualifications that count against the limit (available and unexpired, locked, used or
    forfeited: exactly what the claim rule counts) are at most the policy's per-person limit,
    or at most what the person's consumers already held together when they were last linked
    (a link does not take back claims made before it; no claim is allowed above the limit)."""
    allowed = max(limit, held_when_linked)
    if held < 0 or held > allowed:
        linked = f" (held {held_when_linked} when linked)" if held_when_linked > limit else ""
        raise InvariantViolation(
            f"person {person_id} / {category}: holds {held} qualifications > limit {limit}" + linked
        )


def check_person_limits(
    held: Mapping[tuple[str, str], int],
    person_of: Mapping[str, str],
    limit_of: Callable[[str], int],
    held_when_linked: Mapping[tuple[str, str], int] | None = None,
) -> None:
    """:func:`check_person_limit` for every person: ``held`` is what each (consumer, category)
    holds, ``person_of`` each consumer's person (a consumer missing from it is a person of
    their own), ``held_when_linked`` what a (person, category) held when last linked. Counting
    per person, not per consumer, is what makes linked identities one person for the limit."""
    per_person: Counter[tuple[str, str]] = Counter()
    for (consumer_id, category), n in held.items():
        per_person[(person_of.get(consumer_id, consumer_id), category)] += n
    linked = held_when_linked or {}
    for (person_id, category), n in sorted(per_person.items()):
        check_person_limit(
            person_id,
            category,
            held=n,
            limit=limit_of(category),
            held_when_linked=linked.get((person_id, category), 0),
        )


def check_quota(category: str, day: str, *, issued: int, quota: int) -> None:
    """Per daily quota: issued ≤ quota."""
    if issued < 0 or issued > quota:
        raise InvariantViolation(f"quota {category} {day}: issued {issued} > quota {quota}")


def check_quota_counted(category: str, day: str, *, counter: int, claimed: int) -> None:
    """Per daily quota: the counter the claim rule reads equals the qualifications claimed
    that day (a counter behind the claims would let the quota be over-issued)."""
    if counter != claimed:
        raise InvariantViolation(
            f"quota {category} {day}: the counter says {counter}, {claimed} were claimed"
        )


def check_serial_once(serial_orders: Iterable[tuple[str, str]]) -> None:
    """One subsidy per serial number / IMEI: no serial bound to two captured orders."""
    seen: dict[str, str] = {}
    for serial, order in serial_orders:
        if serial in seen and seen[serial] != order:
            raise InvariantViolation(f"serial ...{serial[-4:]} subsidised twice")
        seen[serial] = order


def check_audit_complete(
    service_events: Mapping[str, Iterable[str]], audit_event_ids: Iterable[str]
) -> None:
    """Every event in every service's store appears exactly once in the audit log."""
    counts = Counter(audit_event_ids)
    duplicated = [e for e, n in counts.items() if n > 1]
    if duplicated:
        raise InvariantViolation(f"{len(duplicated)} events appear more than once in the audit log")
    expected: set[str] = set()
    for service, ids in service_events.items():
        ids = set(ids)
        missing = ids - counts.keys()
        if missing:
            raise InvariantViolation(
                f"{len(missing)} events of {service} are missing from the audit log"
            )
        expected |= ids
    unknown = counts.keys() - expected
    if unknown:
        raise InvariantViolation(f"{len(unknown)} audit entries match no service's event")


class EventDigest(NamedTuple):
    """One event as the log-to-store cross-check compares it: the service it belongs to (the
    store that listed it, or the service the log's envelope names), its id, the SHA-256 of its
    envelope's bytes, and where it belongs (only to say so in a violation)."""

    service: str
    event_id: str
    sha256_hex: str
    stream_id: str = ""
    stream_version: int = 0
    event_type: str = ""

    def described(self) -> str:
        """The event's id, and whose event of which stream and type it is."""
        where = f"{self.service} {self.stream_id} v{self.stream_version} {self.event_type}"
        return f"{self.event_id} ({where})"


class LogStoreMismatch(InvariantViolation):
    """The audit log and the services' stores disagree: ``counts`` has a line per service
    whose counts differ, ``events`` a line per event in question (the message shows at most
    ``cap`` of them, and how many more there are)."""

    def __init__(self, counts: list[str], events: list[str], *, only_unlogged: bool, cap: int):
        self.counts = counts
        self.events = events
        # Nothing but store events the log does not have (yet): what a log still catching up
        # looks like, so a verifier may wait and look again; anything else is final.
        self.only_unlogged = only_unlogged
        self.shown = events[:cap]
        self.more = len(events) - len(self.shown)
        lines = [*counts, *self.shown, *([f"... and {self.more} more"] if self.more else [])]
        super().__init__("\n".join(lines))


def check_log_matches_stores(
    stored: Iterable[EventDigest],
    logged: Iterable[tuple[int, EventDigest]],
    *,
    skipped: Mapping[str, tuple[str, str]] | None = None,
    cap: int = 20,
) -> dict[str, int]:
    """The audit log holds exactly the events of the services' stores, byte for byte: per
    service as many entries as its store has events; every entry ``(index, digest)`` is an event
    of the store of the service its envelope names, with the same envelope hash, and appears
    once; every stored event is in the log. Returns the events per service; raises
    :class:`LogStoreMismatch` naming each event on one side only or different between them.

    ``skipped`` maps an event id to ``(service, skip's event id)`` for each
    ``OutboxEventSkipped`` the log holds: that service's operator let its outbox relay past
    the event, which was therefore never published. Its absence from the log is accounted for
    if the skip itself is a true entry (in that service's store, with the same bytes).

    ``check_audit_complete`` compares ids only; this also catches an entry whose bytes were
    changed (the log's hash chain alone cannot: whoever can write the log can rechain it)."""
    by_id: dict[str, EventDigest] = {}
    problems: list[tuple[int, str]] = []  # (sort key, line): log entries first, by index
    store_counts: Counter[str] = Counter()
    for event in stored:
        store_counts[event.service] += 1
        seen = by_id.setdefault(event.event_id, event)
        if seen is not event:
            problems.append(
                (
                    -1,
                    f"event {event.event_id} is in two stores: {seen.service}'s and"
                    f" {event.service}'s",
                )
            )
    log_counts: Counter[str] = Counter()
    entries: dict[str, list[int]] = {}
    verified: set[str] = set()  # entries that match their store's event
    for index, entry in logged:
        log_counts[entry.service] += 1
        entries.setdefault(entry.event_id, []).append(index)
        if len(entries[entry.event_id]) > 1:
            continue  # reported once, below
        mine = by_id.get(entry.event_id)
        if mine is None:
            line = f"audit entry {index}: event {entry.described()} is in no service's store"
        elif mine.service != entry.service:
            line = (
                f"audit entry {index}: event {entry.described()} names {entry.service} but is "
                f"in {mine.service}'s store"
            )
        elif mine.sha256_hex != entry.sha256_hex:
            line = (
                f"audit entry {index}: event {entry.described()} differs from {mine.service}'s "
                f"store: envelope sha256 {entry.sha256_hex} in the log, {mine.sha256_hex} in "
                "the store"
            )
        else:
            verified.add(entry.event_id)
            continue
        problems.append((index, line))
    for event_id, indexes in entries.items():
        if len(indexes) > 1:
            listed = ", ".join(map(str, indexes))
            problems.append(
                (
                    indexes[1],
                    f"event {event_id} is in the audit log {len(indexes)} times (entries {listed})",
                )
            )
    unlogged = [e for e in by_id.values() if e.event_id not in entries]
    skips = {
        event_id: service
        for event_id, (service, skip_id) in (skipped or {}).items()
        if skip_id in verified
    }
    passed = Counter(e.service for e in unlogged if skips.get(e.event_id) == e.service)
    unlogged = [e for e in unlogged if skips.get(e.event_id) != e.service]
    lines = [line for _, line in sorted(problems, key=lambda p: p[0])]
    lines += [
        f"event {e.described()} is in {e.service}'s store but not in the audit log"
        for e in unlogged
    ]
    counts = [
        f"{service}: {log_counts[service]} entries in the audit log, {store_counts[service]} "
        "events in its store"
        + (f" ({passed[service]} skipped by an operator)" if passed[service] else "")
        for service in sorted(store_counts.keys() | log_counts.keys())
        if log_counts[service] + passed[service] != store_counts[service]
    ]
    if lines or counts:
        raise LogStoreMismatch(counts, lines, only_unlogged=not problems, cap=cap)
    return dict(sorted(store_counts.items()))


class MerchantSettled(NamedTuple):
    """What a merchant's settlement events add up to (``services.ledger.settlement_domain
    .settled``): fen paid (net of paid batches), the subsidy of their lines still unrefunded,
    the clawbacks recorded on their refunded lines, and the clawbacks they deducted."""

    paid: int
    unrefunded: int
    clawed: int
    deducted: int


def check_paid_covered(merchant_id: str, s: MerchantSettled) -> None:
    """Every fen paid to a merchant is covered by an evidenced, unrefunded capture or a recorded
    clawback: paid = unrefunded + clawed - deducted (the paid batches' lines, their clawbacks,
    and what those batches deducted), nothing negative."""
    if min(s) < 0:
        raise InvariantViolation(f"merchant {merchant_id}: negative settlement figures {s}")
    if s.paid != s.unrefunded + s.clawed - s.deducted:
        raise InvariantViolation(
            f"merchant {merchant_id}: paid {s.paid} fen != unrefunded {s.unrefunded}"
            f" + clawed back {s.clawed} - deducted {s.deducted}"
        )


def check_machine_event(event_type: str, *, by_person: bool, machine: Collection[str]) -> None:
    """An event only platforms and services cause (``machine``: services.kernel.events.
    MACHINE_EVENTS) never has a person (an operator, approver or auditor) as its actor: the
    audit's record of every action of a person (services/audit/cases.py) does not subscribe to
    them, so one caused by a person would go unrecorded. The store checks it at every append."""
    if by_person and event_type in machine:
        raise InvariantViolation(
            f"{event_type} is caused by platforms and services only, yet a person is its actor"
        )
