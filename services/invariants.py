"""The system's invariants, each written once.

Unit tests, end-to-end tests, the chaos tests and the audit verifier call these same functions;
each raises :class:`InvariantViolation` naming what broke and returns nothing when it holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


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


def check_person_limit(consumer_id: str, category: str, *, held: int, limit: int) -> None:
    """Per consumer (after same-user linking) and category: the qualifications that count
    against the limit (available and unexpired, locked, used or forfeited: exactly what the
    claim rule counts) are at most the policy's per-person limit."""
    if held < 0 or held > limit:
        raise InvariantViolation(
            f"consumer {consumer_id} / {category}: holds {held} qualifications > limit {limit}"
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
