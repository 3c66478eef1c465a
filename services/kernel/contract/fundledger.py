"""The fund-detail ledger (资金明细台账): every movement of every funding source, with the
source's balances after it, folded from the ledger's events alone.

One row per source a movement touches: a funding (``FUNDED``, or ``SCHEDULED`` for a funding
paid in tranches), a tranche released (``TRANCHE_RELEASED``), a subsidy reserved
(``RESERVED``), captured (``CAPTURED``: spent), released unpaid (``RELEASED``, with the reason:
cancelled or expired), refunded after capture (``REFUNDED``: credited back to the sources that
paid), and a clawback from a merchant already settled for a refunded order (``CLAWBACK``). The
budget figures come from the same fold the ledger decides with and the auditor replays
(:func:`services.kernel.contract.budget.step`), so the running balances are the pool's state
after each event, and the invariants are checked after every one. A clawback moves no budget
(the refund already credited the sources): its rows say what the merchant owes back, per
source that paid, with the balances unchanged.

Rows are in each pool's stream order (its version numbers), pools by id, a clawback right after
the refund it claws back (they are written in one transaction). A pool split into shards is
one pool: its shards' streams merged by when each event occurred, its balances the whole
pool's. So the same events give the same rows whatever order they were read in: the ledger's
store and the audit log (which holds them in the order they reached audit) give
byte-identical files. Pure: envelopes in, rows out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Final

from google.protobuf import symbol_database
from google.protobuf.message import Message

from services.kernel.contract import budget
from services.kernel.contract.budget import POOL_STREAM_PREFIX, UNATTRIBUTED
from subsidy.v1 import events_pb2 as ev

Envelope = ev.EventEnvelope
LEDGER: Final = "ledger"
FUNDED, SCHEDULED, TRANCHE_RELEASED = "FUNDED", "SCHEDULED", "TRANCHE_RELEASED"
RESERVED, CAPTURED, RELEASED, REFUNDED, CLAWBACK = (
    "RESERVED",
    "CAPTURED",
    "RELEASED",
    "REFUNDED",
    "CLAWBACK",
)
KINDS: Final = (FUNDED, SCHEDULED, TRANCHE_RELEASED, RESERVED, CAPTURED, RELEASED, REFUNDED)
KINDS_WITH_CLAWBACK: Final = (*KINDS, CLAWBACK)
_CLAWBACK_TYPE: Final = ev.ClawbackRecorded.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)  # slots: a campaign has millions of them
class Movement:
    """One source's share of one movement, and that source's balances after it (fen)."""

    pool_id: str
    stream_version: int  # the pool stream's version of the event (the refund's, for a clawback)
    source: str  # "" for money a funding named no source for
    kind: str
    amount_fen: int
    order_id: str
    category: str
    reason: str  # a release's: CANCELLED, EXPIRED, REFUNDED; a clawback's batch id
    event_id: str
    occurred_at: str  # RFC 3339, UTC, as the event's envelope says
    funded_fen: int
    scheduled_fen: int
    available_fen: int
    reserved_fen: int
    spent_fen: int


HEADERS: Final = tuple(f.name for f in fields(Movement))


def row(movement: Movement) -> tuple[object, ...]:
    """A movement as a spreadsheet row, in :data:`HEADERS` order."""
    return astuple(movement)


def _payload(env: Envelope) -> Message | None:
    try:
        cls = symbol_database.Default().GetSymbol(env.event_type)
    except KeyError:
        return None  # a type this build does not know moves no money it knows of
    message: Message = cls.FromString(env.payload)
    return message


def _distinct(envelopes: Iterable[Envelope]) -> list[Envelope]:
    """The ledger's events once each (a log may hold an event twice after a redelivery; its
    bytes are the same), those of budget pools and clawbacks only."""
    seen: dict[str, Envelope] = {}
    for env in envelopes:
        if env.service != LEDGER:
            continue
        if env.stream_id.startswith(POOL_STREAM_PREFIX) or env.event_type == _CLAWBACK_TYPE:
            seen.setdefault(env.event_id, env)
    return list(seen.values())


def _balances(pool: budget.Pool, source: str) -> tuple[int, int, int, int, int]:
    s = pool.unattributed if source == UNATTRIBUTED else pool.source(source)
    if s is None:
        return (0, 0, 0, 0, 0)
    return (s.funded, s.scheduled, s.available, s.reserved, s.spent)


def _kind(payload: Message) -> tuple[str, str]:
    if isinstance(payload, ev.BudgetFunded):
        return (SCHEDULED if payload.tranches else FUNDED), ""
    if isinstance(payload, ev.TrancheReleased):
        return TRANCHE_RELEASED, ""
    if isinstance(payload, ev.SubsidyReserved):
        return RESERVED, ""
    if isinstance(payload, ev.SubsidyCaptured):
        return CAPTURED, ""
    if isinstance(payload, ev.SubsidyReleased):
        return (REFUNDED if payload.was_captured else RELEASED), payload.reason
    return "", ""


@dataclass(frozen=True)
class _Refund:
    pool_id: str
    stream_version: int
    position: int  # the refund's place among its pool's events (see _pool_order)
    category: str
    parts: budget.Parts


def _pool_order(shards: dict[int, list[Envelope]]) -> list[tuple[int, Envelope]]:
    """One pool's events as (shard, envelope) in one order: each shard's stream in version
    order, the shards merged by when each event occurred (ties by shard, then version). A pool
    of one shard is its stream in version order; the same events give the same order whatever
    order they were read in, since the key is in each envelope."""
    runs = [
        [(shard, env) for env in sorted(shards[shard], key=lambda e: e.stream_version)]
        for shard in sorted(shards)
    ]
    if len(runs) == 1:
        return runs[0]

    def when(item: tuple[int, Envelope]) -> tuple[int, int, int]:
        shard, env = item
        return (env.occurred_at.ToNanoseconds(), shard, env.stream_version)

    # A merge, not a sort: each shard's version order is kept even if its clock went back.
    return list(heapq.merge(*runs, key=when))


def _pool_balances(shards: dict[int, budget.Pool], source: str) -> tuple[int, int, int, int, int]:
    """A source's balances over every shard of its pool (one shard: that shard's)."""
    if len(shards) == 1:
        return _balances(next(iter(shards.values())), source)
    summed = [0, 0, 0, 0, 0]
    for pool in shards.values():
        for i, fen in enumerate(_balances(pool, source)):
            summed[i] += fen
    return (summed[0], summed[1], summed[2], summed[3], summed[4])


def movements(envelopes: Iterable[Envelope]) -> list[Movement]:
    """Every movement of every source, in the order described above, from the ledger's
    events (any others are ignored). A pool split into shards (``budget-pool/<pool>/<k>``)
    is one pool here: its rows name the pool, its shards' events are merged by when they
    occurred (:func:`_pool_order`), and the balances are the whole pool's, summed over its
    shards; moves of budget between shards change no source's balances and have no row.
    Raises :class:`services.invariants.InvariantViolation` where the events do not add up (the
    budget fold checks every step)."""
    distinct = _distinct(envelopes)
    pools: dict[str, dict[int, list[Envelope]]] = {}
    clawbacks: list[Envelope] = []
    for env in distinct:
        if env.event_type == _CLAWBACK_TYPE:
            clawbacks.append(env)
        else:
            pool_id, shard = budget.stream_shard(env.stream_id)
            pools.setdefault(pool_id, {}).setdefault(shard, []).append(env)
    keyed: list[tuple[tuple[str, int, int], Movement]] = []
    order = {k: i for i, k in enumerate(KINDS_WITH_CLAWBACK)}
    refunds: dict[str, _Refund] = {}  # order -> its latest refund after capture
    for pool_id in sorted(pools):
        states = {shard: budget.Pool(pool_id) for shard in sorted(pools[pool_id])}
        legacy: dict[str, budget.Parts] = {}  # as budget.fold: orders written before sources
        categories: dict[str, str] = {}
        for position, (shard, env) in enumerate(_pool_order(pools[pool_id])):
            payload = _payload(env)
            if payload is None:
                continue
            order_id = str(getattr(payload, "order_id", ""))
            states[shard], parts = budget.step(states[shard], payload, legacy.get(order_id))
            if isinstance(payload, ev.SubsidyReserved):
                categories[order_id] = payload.category
                if not payload.sources:
                    legacy[order_id] = parts
            elif isinstance(payload, ev.SubsidyReleased):
                legacy.pop(order_id, None)
            kind, reason = _kind(payload)
            if not kind:
                continue
            category = str(getattr(payload, "category", "")) or categories.get(order_id, "")
            if isinstance(payload, ev.SubsidyReleased) and payload.was_captured:
                refunds[order_id] = _Refund(pool_id, env.stream_version, position, category, parts)
            at = env.occurred_at.ToJsonString()
            for source, fen in parts:
                movement = Movement(
                    pool_id,
                    env.stream_version,
                    source,
                    kind,
                    fen,
                    order_id,
                    category,
                    reason,
                    env.event_id,
                    at,
                    *_pool_balances(states, source),
                )
                keyed.append(((pool_id, position, order[kind]), movement))
    credited = {
        (pool_id, position, m.source): m
        for (pool_id, position, _), m in keyed
        if m.kind == REFUNDED
    }
    for refund_position, movement in _clawbacks(clawbacks, refunds, credited):
        keyed.append(((movement.pool_id, refund_position, order[CLAWBACK]), movement))
    # A stable sort: the parts of one event stay in the pool's source order.
    keyed.sort(key=lambda item: item[0])
    return [m for _, m in keyed]


def _clawbacks(
    clawbacks: Sequence[Envelope],
    refunds: dict[str, _Refund],
    credited: dict[tuple[str, int, str], Movement],
) -> list[tuple[int, Movement]]:
    """A clawback's rows: its fen split over the sources the refund credited, in the same
    proportions when it differs from the refund (largest remainder, as a pro-rata split),
    with each source's balances as the refund left them. A clawback of an order no refund of
    which is in the events sits at the end, of no pool. Each row with the refund's position
    among its pool's events (0 for one of no pool)."""
    out: list[tuple[int, Movement]] = []
    for env in sorted(clawbacks, key=lambda e: (e.stream_id, e.stream_version)):
        claw = ev.ClawbackRecorded.FromString(env.payload)
        at = env.occurred_at.ToJsonString()
        refund = refunds.get(claw.order_id)
        if refund is None:
            out.append(
                (
                    0,
                    Movement(
                        "",
                        0,
                        UNATTRIBUTED,
                        CLAWBACK,
                        claw.fen,
                        claw.order_id,
                        "",
                        claw.batch_id,
                        env.event_id,
                        at,
                        0,
                        0,
                        0,
                        0,
                        0,
                    ),
                )
            )
            continue
        parts = refund.parts
        if sum(fen for _, fen in parts) != claw.fen:
            payers = [budget.Source(s, funded=fen) for s, fen in parts]
            parts = budget.split_pro_rata(payers, claw.fen)
        for source, fen in parts:
            after = credited.get((refund.pool_id, refund.position, source))
            out.append(
                (
                    refund.position,
                    Movement(
                        refund.pool_id,
                        refund.stream_version,
                        source,
                        CLAWBACK,
                        fen,
                        claw.order_id,
                        refund.category,
                        claw.batch_id,
                        env.event_id,
                        at,
                        *(
                            (
                                after.funded_fen,
                                after.scheduled_fen,
                                after.available_fen,
                                after.reserved_fen,
                                after.spent_fen,
                            )
                            if after is not None
                            else (0, 0, 0, 0, 0)
                        ),
                    ),
                )
            )
    return out


def select(
    rows: Iterable[Movement], pool_id: str = "", source: str | None = None
) -> list[Movement]:
    """The rows of one pool and/or one source (their balances are still the fold's of the
    whole stream)."""
    return [
        m
        for m in rows
        if (not pool_id or m.pool_id == pool_id) and (source is None or m.source == source)
    ]
