"""The budget fold: a pool's figures, and each funding source's, after each ledger event.

A budget pool moves money between buckets: scheduled --tranche released--> available
--reserve--> reserved --capture--> spent; a release moves reserved (or, for a refund after
capture, spent) back to available. A pool holds the money of one or more **funding sources**
(district government, the platform's matching funds, ...), each with its own buckets; the pool's
figures are their sums. Every reservation records how much each source holds
(``SubsidyReserved.sources``), and the capture and release of that order move exactly those
parts, so a refund credits back the sources that paid.

The ledger decides with this fold and the auditor replays the log through it (:func:`fold`),
so both compute the same figures; after every step the invariants are checked: for the pool
and for each source funded = available + reserved + spent, nothing negative
(``services.invariants``). The split rules that decide the parts (:func:`split_priority`,
:func:`split_pro_rata`) are here too, pure, for the ledger's decisions.

**Events written before sources** carry no parts. They fold exactly as before for the pool's
figures; for the sources they are attributed by the priority rule in the order sources first
funded the pool (the default split): a reserve from the sources' available, and its capture or
release by what that reserve attributed (the caller passes it as ``held``; :func:`fold` keeps
it for such orders). A funding that names no source is money of no named source: the pool's
figures count it, no source does (``Pool.unattributed``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from services.invariants import (
    InvariantViolation,
    check_budget_balanced,
    check_source_parts,
    check_sources_add_up,
)
from subsidy.v1 import common_pb2, ledger_pb2
from subsidy.v1 import events_pb2 as ev

POOL_STREAM_PREFIX = "budget-pool/"
BUCKETS = ("funded", "available", "reserved", "spent", "scheduled")
UNATTRIBUTED = ""  # the "source" of money a funding named no source for

# How much of an amount each source holds, pays or gets back: (source, fen) pairs in the pool's
# source order, every fen > 0, summing to the amount.
Parts = tuple[tuple[str, int], ...]


def pool_stream(pool_id: str) -> str:
    """The ledger's stream of one pool's events (the auditor folds each such stream)."""
    return f"{POOL_STREAM_PREFIX}{pool_id}"


# A pool split into shards (PoolSharded): shard 0 is the pool's own stream (fundings, tranches,
# and its share of the checkouts), shard k >= 1 is ``budget-pool/<pool>/<k>`` (a pool id has no
# "/", so the name is unambiguous). Each shard folds on its own; the pool is their sum (total).
SHARD_SEPARATOR = "/"


def shard_stream(pool_id: str, shard: int) -> str:
    """The stream of one shard of a pool (shard 0: the pool's own stream)."""
    return pool_stream(pool_id) if shard == 0 else f"{POOL_STREAM_PREFIX}{pool_id}/{shard}"


def stream_shard(stream_id: str) -> tuple[str, int]:
    """The pool and shard a pool stream belongs to (``budget-pool/p`` -> ("p", 0))."""
    name = stream_id.removeprefix(POOL_STREAM_PREFIX)
    pool_id, _, shard = name.partition(SHARD_SEPARATOR)
    return pool_id, int(shard) if shard.isdigit() else 0


@dataclass(frozen=True)
class Source:
    """One funding source's money in one pool. ``funded`` is what has been released to the
    pool (= available + reserved + spent); ``scheduled`` what approved tranches will add."""

    source: str
    funded: int = 0
    available: int = 0
    reserved: int = 0
    spent: int = 0
    scheduled: int = 0


@dataclass(frozen=True)
class Pool:
    """A pool's figures (the sums over its sources, plus any unattributed money) and its
    sources in the order they first funded it."""

    pool_id: str
    funded: int = 0
    available: int = 0
    reserved: int = 0
    spent: int = 0
    scheduled: int = 0
    sources: tuple[Source, ...] = ()

    def source(self, name: str) -> Source | None:
        """The named source's money in this pool, or None if it never funded it."""
        for s in self.sources:
            if s.source == name:
                return s
        return None

    @property
    def unattributed(self) -> Source:
        """The pool's money no named source holds (fundings that named no source)."""
        figures = {b: getattr(self, b) - sum(getattr(s, b) for s in self.sources) for b in BUCKETS}
        return Source(UNATTRIBUTED, **figures)

    def payers(self) -> tuple[Source, ...]:
        """The sources a subsidy can be split over: the named ones, then the unattributed
        money if there is any."""
        rest = self.unattributed
        return (*self.sources, rest) if rest.funded or rest.scheduled else self.sources

    def check(self) -> None:
        """The invariants: the pool and each source balanced, nothing negative, and the
        sources adding up to no more than the pool."""
        check_budget_balanced(
            self.pool_id,
            funded=self.funded,
            available=self.available,
            reserved=self.reserved,
            spent=self.spent,
        )
        if self.scheduled < 0:
            raise InvariantViolation(f"pool {self.pool_id}: scheduled is negative")
        for s in self.sources:
            check_budget_balanced(
                f"{self.pool_id} source {s.source}",
                funded=s.funded,
                available=s.available,
                reserved=s.reserved,
                spent=s.spent,
            )
            if s.scheduled < 0:
                raise InvariantViolation(f"pool {self.pool_id} source {s.source}: scheduled < 0")
        if self.sources:  # none: they hold 0 of each bucket, which is >= 0, checked above
            check_sources_add_up(
                self.pool_id,
                {b: getattr(self, b) for b in BUCKETS},
                [{b: getattr(s, b) for b in BUCKETS} for s in self.sources],
            )


# --------------------------------------------------------------------------------------------
# Split rules: which source pays how much of one subsidy (pure; the ledger decides with them)


def split_priority(payers: Sequence[Source], amount: int, priority: Sequence[str] = ()) -> Parts:
    """``amount`` taken from the sources' available in order: first the sources ``priority``
    lists (those the pool has), then the others in pool order, each as much as it has. Less
    than ``amount`` in total when the pool cannot pay it."""
    listed = [s for name in priority for s in payers if s.source == name]
    order = listed + [s for s in payers if s.source not in priority]
    parts: dict[str, int] = {}
    left = amount
    for s in order:
        take = min(left, s.available)
        if take > 0:
            parts[s.source] = take
            left -= take
    return tuple((s.source, parts[s.source]) for s in payers if s.source in parts)


def split_pro_rata(payers: Sequence[Source], amount: int) -> Parts:
    """``amount`` split in proportion to what each source has funded (released) into the pool,
    in whole fen: each source gets the floor of its exact share, and the fen left over (fewer
    than the number of sources) go one each to the sources with the largest remainders, ties
    to the source that funded the pool first. Deterministic, sums to ``amount``; says nothing
    of whether each source can pay its part (the decision checks that)."""
    weighted = [s for s in payers if s.funded > 0]
    total = sum(s.funded for s in weighted)
    if total <= 0 or amount <= 0:
        return ()
    shares = {s.source: amount * s.funded // total for s in weighted}
    left = amount - sum(shares.values())
    by_remainder = sorted(
        range(len(weighted)), key=lambda i: (-(amount * weighted[i].funded % total), i)
    )
    for i in by_remainder[:left]:
        shares[weighted[i].source] += 1
    return tuple((s.source, shares[s.source]) for s in weighted if shares[s.source] > 0)


def parts_of(message: Iterable[common_pb2.SourceAmount]) -> Parts:
    """The parts an event records."""
    return tuple((p.source, p.fen) for p in message)


def parts_message(parts: Parts) -> list[common_pb2.SourceAmount]:
    """Parts as an event's ``sources`` field."""
    return [common_pb2.SourceAmount(source=s, fen=fen) for s, fen in parts]


def pool_of(message: ledger_pb2.BudgetPool) -> Pool:
    """The figures a ledger reports (``GetBudget``), as the fold's Pool, to compare with it."""
    return Pool(
        message.pool_id,
        message.funded_fen,
        message.available_fen,
        message.reserved_fen,
        message.spent_fen,
        message.scheduled_fen,
        tuple(
            Source(
                s.source,
                s.funded_fen,
                s.available_fen,
                s.reserved_fen,
                s.spent_fen,
                s.scheduled_fen,
            )
            for s in message.sources
        ),
    )


def total(pool_id: str, shards: Iterable[Pool]) -> Pool:
    """A pool's figures from its shards' (in shard order): every bucket summed, for the pool
    and per source, the sources in the order they first appear (shard 0 holds every funding,
    so that is the order they first funded the pool)."""
    totals = dict.fromkeys(BUCKETS, 0)
    sources: dict[str, dict[str, int]] = {}
    for shard in shards:
        for b in BUCKETS:
            totals[b] += getattr(shard, b)
        for s in shard.sources:
            into = sources.setdefault(s.source, dict.fromkeys(BUCKETS, 0))
            for b in BUCKETS:
                into[b] += getattr(s, b)
    return Pool(
        pool_id,
        sources=tuple(Source(name, **figures) for name, figures in sources.items()),
        **totals,
    )


# --------------------------------------------------------------------------------------------
# The fold


def _with_source(pool: Pool, name: str, **delta: int) -> Pool:
    """``pool`` with ``delta`` added to the source ``name``'s buckets and to the pool's (the
    unattributed money changes the pool's figures only). A named source new to the pool is
    added after the others."""
    # Built with the constructors, not dataclasses.replace (several times slower: the
    # auditor's replay folds every pool event of the log through here).
    totals = {b: getattr(pool, b) + delta.get(b, 0) for b in BUCKETS}
    if name == UNATTRIBUTED:
        return Pool(pool.pool_id, sources=pool.sources, **totals)
    sources = list(pool.sources)
    for i, s in enumerate(sources):
        if s.source == name:
            sources[i] = Source(name, **{b: getattr(s, b) + delta.get(b, 0) for b in BUCKETS})
            break
    else:
        sources.append(Source(name, **delta))
    return Pool(pool.pool_id, sources=tuple(sources), **totals)


def _move(pool: Pool, parts: Parts, source_bucket: str, target_bucket: str) -> Pool:
    for name, fen in parts:
        if name != UNATTRIBUTED and pool.source(name) is None:
            raise InvariantViolation(f"pool {pool.pool_id}: source {name!r} never funded it")
        pool = _with_source(pool, name, **{source_bucket: -fen, target_bucket: fen})
    return pool


def _attributed(pool: Pool, amount: int, bucket: str) -> Parts:
    """What an event without parts moves from ``bucket``: the priority rule in pool order,
    the unattributed money last (the rest, whatever it is: the invariant judges it)."""
    parts: list[tuple[str, int]] = []
    left = amount
    for s in pool.sources:
        take = min(left, getattr(s, bucket))
        if take > 0:
            parts.append((s.source, take))
            left -= take
    if left:
        parts.append((UNATTRIBUTED, left))
    return tuple(parts)


Moving = ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased


def _parts(pool: Pool, event: Moving, bucket: str, held: Parts | None) -> Parts:
    amount = event.subsidy_fen
    recorded = parts_of(event.sources)
    if recorded:
        what = f"pool {pool.pool_id}: {type(event).__name__} {event.order_id}"
        check_source_parts(what, amount, recorded)
        return recorded
    if held is not None and sum(fen for _, fen in held) == amount:
        return held
    return _attributed(pool, amount, bucket)


def _shard_parts(pool: Pool, event: ev.ShardBudgetSent | ev.ShardBudgetReceived) -> Parts:
    """What a move between shards moves, per source (recorded on the event, always)."""
    parts = parts_of(event.sources)
    what = f"pool {pool.pool_id}: {type(event).__name__} {event.from_shard}->{event.to_shard}"
    check_source_parts(what, event.amount_fen, parts)
    return parts


def step(pool: Pool, event: Message, held: Parts | None = None) -> tuple[Pool, Parts]:
    """The pool after ``event``, and the parts the event moved (per source).

    ``held`` is what the order's reservation attributed to each source, for a capture or a
    release that records no parts (written before sources); without it such an event is
    attributed by priority, which is exact for a pool of one source."""
    parts: Parts = ()
    if isinstance(event, ev.BudgetFunded):
        name = event.source
        if event.tranches:
            pool = _with_source(pool, name, scheduled=event.amount_fen)
        else:
            pool = _with_source(pool, name, funded=event.amount_fen, available=event.amount_fen)
        parts = ((name, event.amount_fen),)
    elif isinstance(event, ev.TrancheReleased):
        if event.source != UNATTRIBUTED and pool.source(event.source) is None:
            raise InvariantViolation(f"pool {pool.pool_id}: no tranche of {event.source!r}")
        fen = event.amount_fen
        pool = _with_source(pool, event.source, scheduled=-fen, funded=fen, available=fen)
        parts = ((event.source, fen),)
    elif isinstance(event, ev.ShardBudgetSent):
        parts = _shard_parts(pool, event)
        for name, fen in parts:
            if name != UNATTRIBUTED and pool.source(name) is None:
                raise InvariantViolation(f"pool {pool.pool_id}: source {name!r} never funded it")
            pool = _with_source(pool, name, funded=-fen, available=-fen)
    elif isinstance(event, ev.ShardBudgetReceived):
        parts = _shard_parts(pool, event)
        for name, fen in parts:
            pool = _with_source(pool, name, funded=fen, available=fen)
    elif isinstance(event, ev.SubsidyReserved):
        parts = _parts(pool, event, "available", None)
        pool = _move(pool, parts, "available", "reserved")
    elif isinstance(event, ev.SubsidyCaptured):
        parts = _parts(pool, event, "reserved", held)
        pool = _move(pool, parts, "reserved", "spent")
    elif isinstance(event, ev.SubsidyReleased):
        bucket = "spent" if event.was_captured else "reserved"
        parts = _parts(pool, event, bucket, held)
        pool = _move(pool, parts, bucket, "available")
    pool.check()
    return pool, parts


def apply(pool: Pool, event: Message, held: Parts | None = None) -> Pool:
    """The pool after ``event``; the same fold serves inline updates and replays."""
    return step(pool, event, held)[0]


def fold(pool_id: str, events: Iterable[Message]) -> Pool:
    """One pool's stream, in stream order, folded from nothing: what the auditor rebuilds.

    Pure: events in, figures out (the invariants checked after every event). Keeps what each
    order written without source parts was attributed, so its capture and release move the
    same parts (orders written with parts carry them on every event and need no memory)."""
    tally = Tally(pool_id)
    legacy: dict[str, Parts] = {}
    for event in events:
        order_id = getattr(event, "order_id", "")
        parts = tally.step(event, legacy.get(order_id))
        if isinstance(event, ev.SubsidyReserved) and not event.sources:
            legacy[order_id] = parts
        elif isinstance(event, ev.SubsidyReleased):
            legacy.pop(order_id, None)
    return tally.pool()


# Bucket positions in a Tally's figure lists (the order of BUCKETS); _NONE: no bucket,
# _RELEASED: into funded and available at once.
_F, _A, _R, _S, _SCH = range(5)
_NONE, _RELEASED, _WITHDRAWN = -1, -2, -3  # _WITHDRAWN: out of funded and available at once
Move = tuple[str, int, int, int]  # (source, fen, from bucket, to bucket)


class Tally:
    """One pool folded in place: :func:`step` event after event, without building a frozen
    :class:`Pool` per event (a replay of a whole log folds a million events; :func:`fold` and
    the auditor use this). The same arithmetic and the same invariants after every event: the
    pool's figures, every source the event moved (the others did not change since they were
    last checked), and the named sources' sums against the pool's, kept as running sums. When
    an event would break one, the tally is left as it was and :func:`step` of the frozen pool
    raises, so the violation says exactly what the frozen fold says."""

    __slots__ = ("named", "pool_id", "sources", "totals")

    def __init__(self, pool_id: str) -> None:
        self.pool_id = pool_id
        self.totals = [0, 0, 0, 0, 0]  # funded, available, reserved, spent, scheduled
        self.sources: dict[str, list[int]] = {}  # in the order they first funded the pool
        self.named = [0, 0, 0, 0, 0]  # the named sources' sums, per bucket

    def pool(self) -> Pool:
        """The frozen figures."""
        f, a, r, s, sch = self.totals
        return Pool(
            self.pool_id,
            f,
            a,
            r,
            s,
            sch,
            tuple(Source(name, *figures) for name, figures in self.sources.items()),
        )

    def _attributed(self, amount: int, at: int) -> Parts:
        # as _attributed: the priority rule in pool order, the unattributed money last
        parts: list[tuple[str, int]] = []
        left = amount
        for name, figures in self.sources.items():
            take = min(left, figures[at])
            if take > 0:
                parts.append((name, take))
                left -= take
        if left:
            parts.append((UNATTRIBUTED, left))
        return tuple(parts)

    def _parts(self, event: Moving, at: int, held: Parts | None) -> Parts | None:
        """As :func:`_parts`; None for recorded parts that check_source_parts refuses."""
        amount = event.subsidy_fen
        if event.sources:
            recorded = parts_of(event.sources)
            if any(fen <= 0 for _, fen in recorded) or sum(f for _, f in recorded) != amount:
                return None
            return recorded
        if held is not None:
            total = 0
            for _, fen in held:
                total += fen
            if total == amount:
                return held
        return self._attributed(amount, at)

    def step(self, event: Message, held: Parts | None = None) -> Parts:
        """As :func:`step`: the tally after ``event``; returns the parts it moved."""
        added = ""  # a source this event adds to the pool
        moving: Moving | None = None
        if isinstance(event, ev.SubsidyReserved):
            moving, at, to = event, _A, _R
        elif isinstance(event, ev.SubsidyCaptured):
            moving, at, to = event, _R, _S
        elif isinstance(event, ev.SubsidyReleased):
            moving, at, to = event, (_S if event.was_captured else _R), _A
        if moving is not None:
            found = self._parts(moving, at, held)
            if found is None:
                return self._refuse(event, held)
            for name, _ in found:
                if name != UNATTRIBUTED and name not in self.sources:
                    return self._refuse(event, held)
            parts = found
            moves = [(name, fen, at, to) for name, fen in parts]
        elif isinstance(event, ev.BudgetFunded):
            name, fen = event.source, event.amount_fen
            parts = ((name, fen),)
            if name != UNATTRIBUTED and name not in self.sources:
                self.sources[name] = [0, 0, 0, 0, 0]  # after the others
                added = name
            moves = [(name, fen, _NONE, _SCH if event.tranches else _RELEASED)]
        elif isinstance(event, ev.TrancheReleased):
            name, fen = event.source, event.amount_fen
            if name != UNATTRIBUTED and name not in self.sources:
                return self._refuse(event, held)
            parts = ((name, fen),)
            moves = [(name, fen, _SCH, _RELEASED)]
        elif isinstance(event, ev.ShardBudgetSent | ev.ShardBudgetReceived):
            return self._shard_move(event)
        else:  # moves no money: the figures are as they were, and were checked
            return ()
        self._apply(moves, 1)
        if not self._holds(moves):
            self._apply(moves, -1)
            if added:
                del self.sources[added]
            return self._refuse(event, held)
        return parts

    def _shard_move(self, event: ev.ShardBudgetSent | ev.ShardBudgetReceived) -> Parts:
        """A move between shards: out of (Sent) or into (Received) this shard's funded and
        available, per source (a source new to the shard is added after the others)."""
        parts = parts_of(event.sources)
        if any(fen <= 0 for _, fen in parts) or sum(f for _, f in parts) != event.amount_fen:
            return self._refuse(event, None)
        added: list[str] = []
        if isinstance(event, ev.ShardBudgetSent):
            if any(n != UNATTRIBUTED and n not in self.sources for n, _ in parts):
                return self._refuse(event, None)
            moves = [(name, fen, _WITHDRAWN, _NONE) for name, fen in parts]
        else:
            for name, _ in parts:
                if name != UNATTRIBUTED and name not in self.sources:
                    self.sources[name] = [0, 0, 0, 0, 0]
                    added.append(name)
            moves = [(name, fen, _NONE, _RELEASED) for name, fen in parts]
        self._apply(moves, 1)
        if not self._holds(moves):
            self._apply(moves, -1)
            for name in added:
                del self.sources[name]
            return self._refuse(event, None)
        return parts

    def _apply(self, moves: list[Move], sign: int) -> None:
        for name, fen, at, to in moves:
            figures = self.sources.get(name) if name != UNATTRIBUTED else None
            rows = (self.totals,) if figures is None else (self.totals, self.named, figures)
            fen *= sign
            for row in rows:
                if at == _WITHDRAWN:
                    row[_F] -= fen
                    row[_A] -= fen
                elif at != _NONE:
                    row[at] -= fen
                if to == _RELEASED:
                    row[_F] += fen
                    row[_A] += fen
                elif to != _NONE:
                    row[to] += fen

    def _holds(self, moves: list[Move]) -> bool:
        """The invariants of :meth:`Pool.check` after the moves (the figures are integers:
        sums of protobuf integer fields)."""
        f, a, r, s, sch = self.totals
        if a < 0 or r < 0 or s < 0 or sch < 0 or f != a + r + s:  # (so f >= 0)
            return False
        if not self.sources:  # the named sums are 0, no more than the pool's (checked above)
            return True
        for name, *_ in moves:
            row = self.sources.get(name)
            if row is not None:
                f, a, r, s, sch = row
                if a < 0 or r < 0 or s < 0 or sch < 0 or f != a + r + s:
                    return False
        n, t = self.named, self.totals
        return n[0] <= t[0] and n[1] <= t[1] and n[2] <= t[2] and n[3] <= t[3] and n[4] <= t[4]

    def _refuse(self, event: Message, held: Parts | None) -> Parts:
        """Raise what :func:`step` raises for ``event`` (the tally is as before it)."""
        step(self.pool(), event, held)
        raise AssertionError(f"pool {self.pool_id}: the tally and step disagree on {event}")
