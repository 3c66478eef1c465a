"""What an auditor checks: the log's chain, the money, and the log against every store.

Nothing here trusts a service's own figures: the hash chain is recomputed from the envelopes'
bytes, and every budget pool is rebuilt by folding its events through the budget fold the
ledger itself decides with (:mod:`services.kernel.contract.budget`), which checks the budget
invariant after every event. The chain proves the log was not changed *after* an entry was
written, not that the entry was true: :func:`compare_with_stores` checks each entry against
the store of the service that wrote the event (an entry forged on the bus, or written into the
log's database and rechained, matches no stored event).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from services.invariants import EventDigest, InvariantViolation, check_log_matches_stores
from services.kernel.contract import budget
from services.kernel.contract.budget import POOL_STREAM_PREFIX
from services.kernel.events import Envelope, payload_of
from subsidy.v1 import events_pb2 as ev

from .domain import GENESIS, chain_hash, leaf_hash

POOL_STREAM = POOL_STREAM_PREFIX
SKIPPED = ev.OutboxEventSkipped.DESCRIPTOR.full_name


@dataclass
class Replay:
    """The outcome of replaying the log: its size and head, and every pool's figures."""

    size: int = 0
    head: bytes = GENESIS
    pools: dict[str, budget.Pool] = field(default_factory=dict)
    events_by_service: dict[str, int] = field(default_factory=dict)


def replay(entries: Iterable[tuple[int, bytes, bytes, bytes]]) -> Replay:
    """Replay ``(index, leaf hash, chain hash, envelope bytes)`` from index 0, in order.

    The log records events in the order they reached the audit service, which after a crash or
    a redelivery is not the order they happened in; each budget pool is therefore folded in its
    own stream's version order, and a missing version is a violation.
    """
    out = Replay()
    pool_events: dict[str, dict[int, Message]] = {}
    for idx, leaf, chained, data in entries:
        if idx != out.size:
            raise InvariantViolation(f"audit entry {idx} out of order (expected {out.size})")
        if leaf_hash(data) != leaf or chain_hash(out.head, leaf) != chained:
            raise InvariantViolation(f"audit entry {idx} does not match its hash chain")
        out.head, out.size = chained, out.size + 1
        env = Envelope.FromString(data)
        out.events_by_service[env.service] = out.events_by_service.get(env.service, 0) + 1
        if env.service == "ledger" and env.stream_id.startswith(POOL_STREAM):
            versions = pool_events.setdefault(env.stream_id.removeprefix(POOL_STREAM), {})
            if env.stream_version in versions:
                raise InvariantViolation(f"{env.stream_id} v{env.stream_version} logged twice")
            versions[env.stream_version] = payload_of(env)
    for pool_id, versions in sorted(pool_events.items()):
        if sorted(versions) != list(range(1, len(versions) + 1)):
            raise InvariantViolation(f"{POOL_STREAM}{pool_id}: events missing from the log")
        # Checks the invariants (per pool and per funding source) after every event.
        out.pools[pool_id] = budget.fold(pool_id, (versions[v] for v in sorted(versions)))
    return out


def compare_pools(replayed: dict[str, budget.Pool], reported: dict[str, budget.Pool]) -> None:
    """The ledger's figures must be exactly what the log's events add up to."""
    for pool_id in sorted(replayed.keys() | reported.keys()):
        if replayed.get(pool_id) != reported.get(pool_id):
            raise InvariantViolation(
                f"pool {pool_id}: the log adds up to {replayed.get(pool_id)},"
                f" the ledger reports {reported.get(pool_id)}"
            )


def compare_with_stores(
    entries: Iterable[tuple[int, bytes, bytes, bytes]], stored: Iterable[EventDigest]
) -> dict[str, int]:
    """Cross-check the log's ``(index, leaf hash, chain hash, envelope bytes)`` entries with
    every event the services' stores list (``stored``, each with the SHA-256 of its stored
    envelope bytes): see :func:`services.invariants.check_log_matches_stores`, which raises
    :class:`~services.invariants.LogStoreMismatch` naming every event that differs. A stored
    event the log lacks because an operator skipped it at the outbox (the log holds that
    service's ``OutboxEventSkipped`` naming it) is accounted for. Returns the events per
    service."""
    logged = []
    skipped: dict[str, tuple[str, str]] = {}
    for idx, _, _, data in entries:
        env = Envelope.FromString(data)
        if env.event_type == SKIPPED:
            stuck = ev.OutboxEventSkipped.FromString(env.payload).event_id
            skipped[stuck] = (env.service, env.event_id)
        digest = EventDigest(
            env.service,
            env.event_id,
            hashlib.sha256(data).hexdigest(),
            env.stream_id,
            env.stream_version,
            env.event_type,
        )
        logged.append((idx, digest))
    return check_log_matches_stores(stored, logged, skipped=skipped)
