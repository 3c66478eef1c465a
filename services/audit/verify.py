"""What an auditor checks from the audit log alone: the chain, and the money.

Nothing here trusts a service's own figures: the hash chain is recomputed from the envelopes'
bytes, and every budget pool is rebuilt by folding its events with the ledger's own decision
code, which checks the budget invariant after every event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.invariants import InvariantViolation
from services.kernel.events import Envelope, payload_of
from services.ledger import domain as ledger_domain

from .log import GENESIS, chain_hash, leaf_hash


@dataclass
class Replay:
    """The outcome of replaying the log: its size and head, and every pool's figures."""

    size: int = 0
    head: bytes = GENESIS
    pools: dict[str, ledger_domain.Pool] = field(default_factory=dict)
    events_by_service: dict[str, int] = field(default_factory=dict)


def replay(entries: Iterable[tuple[int, bytes, bytes, bytes]]) -> Replay:
    """Replay ``(index, leaf hash, chain hash, envelope bytes)`` from index 0, in order."""
    out = Replay()
    for idx, leaf, chained, data in entries:
        if idx != out.size:
            raise InvariantViolation(f"audit entry {idx} out of order (expected {out.size})")
        if leaf_hash(data) != leaf or chain_hash(out.head, leaf) != chained:
            raise InvariantViolation(f"audit entry {idx} does not match its hash chain")
        out.head, out.size = chained, out.size + 1
        env = Envelope.FromString(data)
        out.events_by_service[env.service] = out.events_by_service.get(env.service, 0) + 1
        if env.service == "ledger":
            event = payload_of(env)
            pool_id = getattr(event, "pool_id", "")
            if pool_id and not env.event_type.endswith("ReservationRefused"):
                before = out.pools.get(pool_id, ledger_domain.Pool(pool_id))
                out.pools[pool_id] = ledger_domain.apply(before, event)  # checks the invariant
    return out


def compare_pools(
    replayed: dict[str, ledger_domain.Pool], reported: dict[str, ledger_domain.Pool]
) -> None:
    """The ledger's figures must be exactly what the log's events add up to."""
    for pool_id in sorted(replayed.keys() | reported.keys()):
        if replayed.get(pool_id) != reported.get(pool_id):
            raise InvariantViolation(
                f"pool {pool_id}: the log adds up to {replayed.get(pool_id)},"
                f" the ledger reports {reported.get(pool_id)}"
            )
