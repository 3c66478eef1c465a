"""Every total the services report, rebuilt from the log's events alone, and compared.

Each kind of total is a :class:`Fold`: the event types it reads, what it does with each event
(in its stream's version order: the log's order is the order events *reached* audit), and the
table it ends with, ``{key: {figure: integer}}``. ``subsidyctl audit verify`` runs every fold
over the log, asks the service that owns each total for its own figures (through that service's
read RPCs) and :func:`compare` lists every key and figure that differs.

- ``pool``: each budget pool's funded / available / reserved / spent, through the ledger's own
  fold (:mod:`services.kernel.contract.budget`, which checks the budget invariant after every
  event; a missing or repeated version of a pool's stream is a violation);
- ``quota``: qualifications issued per category and campaign day (eligibility's daily quota);
- ``person``: each person's qualifications per category by status, the person named by the
  blind index of their ID number (never the number);
- ``sales``: the sales ledger (销售台账) per merchant and SKU: units, sales and subsidy captured,
  and what was refunded;
- ``settlement``: each merchant settlement batch (merchant, period, the orders it pays, gross,
  the clawbacks it deducts, net, approved, paid), with the settlement invariants checked;
- ``returns``: the returns ledger (退换货台账): each refund of a captured order, the batch that
  had paid it, whether it was clawed back and the batch that deducted that.

The auditor folds qualifications, sales and settlement itself, from the events' meaning in
``proto/subsidy/v1/events.proto``, rather than with eligibility's or catalog's code (which the
architecture keeps inside those services): two implementations that must agree. A new kind of
total is a new Fold here, listed in :data:`FOLDS`, and a
reader of the owning service's figures in ``subsidyctl/cli/audit/live.py``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

from google.protobuf import empty_pb2, symbol_database
from google.protobuf.message import Message

from services.invariants import (
    InvariantViolation,
    MerchantSettled,
    check_paid_covered,
    check_shard_moves_balance,
)
from services.kernel.contract import budget
from services.kernel.contract.budget import POOL_STREAM_PREFIX
from services.kernel.events import Envelope
from subsidy.v1 import events_pb2 as ev

Key = tuple[str, ...]
Table = dict[Key, dict[str, int]]


def _name(message: type[Message]) -> str:
    return message.DESCRIPTOR.full_name


_FUNDED, _TRANCHE = _name(ev.BudgetFunded), _name(ev.TrancheReleased)
_RESERVED, _CAPTURED, _RELEASED = (
    _name(ev.SubsidyReserved),
    _name(ev.SubsidyCaptured),
    _name(ev.SubsidyReleased),
)
_SENT, _RECEIVED = _name(ev.ShardBudgetSent), _name(ev.ShardBudgetReceived)
_PREFIX = len(POOL_STREAM_PREFIX)
_REGISTERED, _CLAIMED = _name(ev.ConsumerRegistered), _name(ev.QualificationClaimed)


@cache
def _payload_class(event_type: str) -> type[Message]:
    """The payload's message class; an event type this build does not know reads as empty
    (no fold counts it; a pool's stream still sees its version)."""
    try:
        cls: type[Message] = symbol_database.Default().GetSymbol(event_type)
    except KeyError:
        return empty_pb2.Empty
    return cls


@dataclass(frozen=True)
class Difference:
    """One figure the log's events and the live service disagree on (None: the key is on
    one side only)."""

    total: str
    key: Key
    figure: str
    log: int | None
    live: int | None

    def describe(self) -> str:
        where = f"{self.total} {'/'.join(self.key)}"
        if self.log is None:
            return f"{where}: the service reports {self.figure} {self.live}, the log has none"
        if self.live is None:
            return f"{where}: the log adds up to {self.figure} {self.log}, the service has none"
        return f"{where}: {self.figure} is {self.log} by the log, {self.live} by the service"

    def as_json(self) -> dict[str, Any]:
        return {
            "check": "totals",
            "total": self.total,
            "key": list(self.key),
            "figure": self.figure,
            "log": self.log,
            "live": self.live,
            "message": self.describe(),
        }


def compare(total: str, log: Table, live: Table) -> list[Difference]:
    """Every figure of every key that differs between what the log adds up to and what the
    service reports; a figure missing on one side counts as 0, a key missing on one side makes
    each of the other side's figures a difference (with None for the missing side)."""
    found: list[Difference] = []
    for key in sorted(log.keys() | live.keys()):
        mine, theirs = log.get(key), live.get(key)
        for figure in sorted((mine or {}).keys() | (theirs or {}).keys()):
            a = None if mine is None else mine.get(figure, 0)
            b = None if theirs is None else theirs.get(figure, 0)
            if a != b:
                found.append(Difference(total, key, figure, a, b))
    return found


# How a fold reads one kind of event when it needs only the event's stream id, its version and
# its payload: chosen once per kind by Fold.handler, so that the replay's hot loop hands over
# three values and no envelope, and the fold branches on nothing per event.
Handler = Callable[[str, int, Message], None]


def _ignore(stream: str, version: int, payload: Message) -> None:
    """The handler of an event a fold does not read."""


class Fold:
    """A total rebuilt from events: subclasses name the event types they read."""

    name: ClassVar[str]
    service: ClassVar[str]  # whose events it reads first (the owner of the figures)
    event_types: ClassVar[frozenset[str]]

    def wants(self, env: Envelope) -> bool:
        """Whether this fold reads ``env`` (by default: by its event type). It may depend on
        the event's service, its type and the kind of its stream (the stream id up to its
        first ``/``) only: :class:`Rebuild` remembers the answer per those three."""
        return env.event_type in self.event_types

    def handler(self, env: Envelope) -> Handler | None:
        """What reads the events of ``env``'s kind (its service, type and kind of stream, as
        :meth:`wants`) from their stream id, version and payload alone; None (the default):
        :meth:`add` reads them, envelope and all. :class:`Rebuild` asks once per kind."""
        return None

    def repeated(self, env: Envelope) -> None:
        """``env``'s stream version was in the log already (the cross-check names the entry;
        a fold whose figures depend on every version may say so too)."""

    def add(self, env: Envelope, payload: Message) -> None:
        raise NotImplementedError

    def table(self) -> Table:
        raise NotImplementedError


@dataclass
class PoolFold(Fold):
    """Each pool, through the ledger's budget fold, in its stream's version order."""

    name: ClassVar[str] = "pool"
    service: ClassVar[str] = "ledger"
    event_types: ClassVar[frozenset[str]] = frozenset(
        _name(m)
        for m in (
            ev.BudgetFunded,
            ev.TrancheReleased,
            ev.SubsidyReserved,
            ev.SubsidyCaptured,
            ev.SubsidyReleased,
            ev.ShardBudgetSent,
            ev.ShardBudgetReceived,
        )
    )
    # Each pool folded in place (budget.Tally: budget.step's arithmetic and invariants without
    # a frozen Pool per event); frozen by pools(). A shard k >= 1 of a pool is keyed "pool/k".
    folded: dict[str, budget.Tally] = field(default_factory=dict)
    # What each order written before funding sources was attributed (budget.fold keeps the
    # same memory), so its capture and release move the same parts.
    legacy: dict[str, dict[str, budget.Parts]] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)  # the last version folded, per pool
    violations: list[str] = field(default_factory=list)
    _stopped: set[str] = field(default_factory=set)  # pools whose fold already failed
    # What shards of a pool sent and received each other ((from, to) -> fen), per pool.
    sent: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)
    received: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)

    def wants(self, env: Envelope) -> bool:
        # Every event of a pool's stream, whatever its type: a version missing from the log
        # is a violation even when the budget fold would ignore that event.
        return env.service == "ledger" and env.stream_id.startswith(POOL_STREAM_PREFIX)

    def repeated(self, env: Envelope) -> None:
        if self.wants(env):
            self.violations.append(f"{env.stream_id} v{env.stream_version} logged twice")

    def handler(self, env: Envelope) -> Handler:
        if not self.wants(env):
            return _ignore
        return {
            _RESERVED: self._reserved,
            _CAPTURED: self._captured,
            _RELEASED: self._released,
            _FUNDED: self._funds,
            _TRANCHE: self._funds,
            _SENT: self._moved,
            _RECEIVED: self._moved,
        }.get(env.event_type, self._version)  # the others move no money, but hold a place

    def add(self, env: Envelope, payload: Message) -> None:
        """The pool's next event (:class:`Rebuild` hands them over in version order)."""
        self.handler(env)(env.stream_id, env.stream_version, payload)

    def _next(self, stream: str, version: int) -> budget.Tally | None:
        """The tally of the stream's pool when ``version`` is its next one (None: the pool's
        fold failed before, or does now for a version missing from the log)."""
        pool_id = stream[_PREFIX:]
        last = self.last
        if pool_id in self._stopped:
            last[pool_id] = version
            return None
        if version != last.get(pool_id, 0) + 1:
            self.violations.append(f"{stream}: events missing from the log")
            self._stopped.add(pool_id)
            last[pool_id] = version
            return None
        last[pool_id] = version
        tally = self.folded.get(pool_id)
        if tally is None:
            tally = self.folded[pool_id] = budget.Tally(pool_id)
            self.legacy[pool_id] = {}
        return tally

    def _step(
        self, tally: budget.Tally, payload: Message, held: budget.Parts | None
    ) -> budget.Parts | None:
        """``budget.Tally.step``, which checks the budget invariants (the pool's and each
        source's) after the event: the parts it moved, or None when it breaks one (and the
        pool's fold stops there)."""
        try:
            return tally.step(payload, held)
        except InvariantViolation as exc:
            self.violations.append(str(exc))
            self._stopped.add(tally.pool_id)
            return None

    def _version(self, stream: str, version: int, payload: Message) -> None:
        self._next(stream, version)

    def _funds(self, stream: str, version: int, payload: Message) -> None:
        if (tally := self._next(stream, version)) is not None:
            self._step(tally, payload, None)  # (no order's parts: held is not read)

    def _moved(self, stream: str, version: int, payload: Message) -> None:
        """Budget one shard of a pool sent a sibling, or received from one: the shard's fold
        moves it, and the pair is kept so that :meth:`pools` checks both sides add up."""
        if (tally := self._next(stream, version)) is None:
            return
        assert isinstance(payload, ev.ShardBudgetSent | ev.ShardBudgetReceived)
        if self._step(tally, payload, None) is None:
            return
        moved = self.sent if isinstance(payload, ev.ShardBudgetSent) else self.received
        pair = (payload.from_shard, payload.to_shard)
        into = moved.setdefault(payload.pool_id, {})
        into[pair] = into.get(pair, 0) + payload.amount_fen

    # An order written before funding sources moves, at its capture and its release, the
    # parts its reservation was attributed (budget.fold keeps the same memory).
    def _reserved(self, stream: str, version: int, payload: Message) -> None:
        if (tally := self._next(stream, version)) is None:
            return
        assert isinstance(payload, ev.SubsidyReserved)
        memory = self.legacy[tally.pool_id]
        parts = self._step(tally, payload, memory.get(payload.order_id))
        if parts is not None and not payload.sources:
            memory[payload.order_id] = parts

    def _captured(self, stream: str, version: int, payload: Message) -> None:
        if (tally := self._next(stream, version)) is not None:
            assert isinstance(payload, ev.SubsidyCaptured)
            self._step(tally, payload, self.legacy[tally.pool_id].get(payload.order_id))

    def _released(self, stream: str, version: int, payload: Message) -> None:
        if (tally := self._next(stream, version)) is None:
            return
        assert isinstance(payload, ev.SubsidyReleased)
        memory = self.legacy[tally.pool_id]
        if self._step(tally, payload, memory.get(payload.order_id)) is not None:
            memory.pop(payload.order_id, None)

    def pools(self) -> dict[str, budget.Pool]:
        """Every pool's figures; raises InvariantViolation for a version logged twice or
        missing, or a step that breaks the budget invariant."""
        if self.violations:
            raise InvariantViolation(self.violations[0])
        shards: dict[str, dict[int, budget.Pool]] = {}
        for name, tally in self.folded.items():
            pool_id, shard = budget.stream_shard(POOL_STREAM_PREFIX + name)
            shards.setdefault(pool_id, {})[shard] = tally.pool()
        out: dict[str, budget.Pool] = {}
        for pool_id in sorted(shards):
            split = shards[pool_id]
            moved = pool_id in self.sent or pool_id in self.received
            if len(split) == 1 and 0 in split and not moved:  # one stream: the pool itself
                out[pool_id] = split[0]
                continue
            # A pool split into shards: each shard was checked as it folded; the pool is
            # their sum, and what they moved between them adds up.
            check_shard_moves_balance(
                pool_id, self.sent.get(pool_id, {}), self.received.get(pool_id, {})
            )
            out[pool_id] = budget.total(pool_id, (split[k] for k in sorted(split)))
        return out

    def table(self) -> Table:
        return pool_table(self.pools().values())


def pool_table(pools: Iterable[budget.Pool]) -> Table:
    """Each pool's figures, and each of its funding sources' (keyed by pool and source)."""
    out: Table = {}
    for p in pools:
        out[(p.pool_id,)] = pool_figures(p)
        for s in p.sources:
            out[(p.pool_id, s.source)] = source_figures(s)
    return out


def pool_figures(p: budget.Pool) -> dict[str, int]:
    return {
        "funded_fen": p.funded,
        "available_fen": p.available,
        "reserved_fen": p.reserved,
        "spent_fen": p.spent,
    }


def source_figures(s: budget.Source) -> dict[str, int]:
    return {
        "funded_fen": s.funded,
        "available_fen": s.available,
        "reserved_fen": s.reserved,
        "spent_fen": s.spent,
        "scheduled_fen": s.scheduled,
    }


@dataclass
class QuotaFold(Fold):
    """Qualifications issued per category and campaign day."""

    name: ClassVar[str] = "quota"
    service: ClassVar[str] = "eligibility"
    event_types: ClassVar[frozenset[str]] = frozenset({_name(ev.QualificationClaimed)})
    issued: dict[Key, int] = field(default_factory=lambda: defaultdict(int))

    def handler(self, env: Envelope) -> Handler:
        return self._claimed if env.event_type in self.event_types else _ignore

    def add(self, env: Envelope, payload: Message) -> None:
        self.handler(env)(env.stream_id, env.stream_version, payload)

    def _claimed(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.QualificationClaimed)
        self.issued[(payload.category, payload.quota_day)] += 1

    def table(self) -> Table:
        return {key: {"issued": n} for key, n in self.issued.items()}


# What each qualification event makes of a qualification (events.proto's comments).
_STATUS: Mapping[str, str] = {
    _name(ev.QualificationClaimed): "AVAILABLE",
    _name(ev.QualificationLocked): "LOCKED",
    _name(ev.QualificationUnlocked): "AVAILABLE",
    _name(ev.QualificationUsed): "USED",
    _name(ev.QualificationRestored): "AVAILABLE",
    _name(ev.QualificationExpired): "EXPIRED",
    _name(ev.QualificationForfeited): "FORFEITED",
}


@dataclass
class PersonFold(Fold):
    """Each person's qualifications per category, by status; the person by blind index."""

    name: ClassVar[str] = "person"
    service: ClassVar[str] = "eligibility"
    event_types: ClassVar[frozenset[str]] = frozenset({_name(ev.ConsumerRegistered), *_STATUS})
    person_of: dict[str, str] = field(default_factory=dict)  # consumer id -> blind index
    # qualification id -> [consumer, category, status] (its status changed in place)
    qualifications: dict[str, list[str]] = field(default_factory=dict)

    def handler(self, env: Envelope) -> Handler:
        kind = env.event_type
        if kind == _REGISTERED:
            return self._registered
        if kind == _CLAIMED:
            return self._claimed
        status = _STATUS.get(kind)
        if status is None:
            return _ignore
        qualifications = self.qualifications

        def changed(stream: str, version: int, payload: Message) -> None:
            qualification = qualifications.get(payload.qualification_id)  # type: ignore[attr-defined]
            if qualification is not None:
                qualification[2] = status

        return changed

    def add(self, env: Envelope, payload: Message) -> None:
        self.handler(env)(env.stream_id, env.stream_version, payload)

    def _registered(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.ConsumerRegistered)
        self.person_of[payload.consumer_id] = payload.id_number_index

    def _claimed(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.QualificationClaimed)
        self.qualifications[payload.qualification_id] = [
            payload.consumer_id,
            payload.category,
            "AVAILABLE",
        ]

    def table(self) -> Table:
        out: Table = {}
        for consumer, category, status in self.qualifications.values():
            counts = out.setdefault((self.person_of.get(consumer, f"?{consumer}"), category), {})
            counts[status] = counts.get(status, 0) + 1
        return out


@dataclass(slots=True)
class _Order:
    sku: str = ""
    merchant_id: str = ""
    category: str = ""
    unit_price_fen: int = 0
    subsidy_fen: int = 0
    reserved: bool = False
    captured: bool = False
    refunded: bool = False


@dataclass
class SalesFold(Fold):
    """The sales ledger: per merchant and SKU, what was captured and what refunded."""

    name: ClassVar[str] = "sales"
    service: ClassVar[str] = "catalog"
    event_types: ClassVar[frozenset[str]] = frozenset(
        _name(m) for m in (ev.SubsidyReserved, ev.SubsidyCaptured, ev.SubsidyReleased)
    )
    orders: dict[str, _Order] = field(default_factory=dict)

    def handler(self, env: Envelope) -> Handler:
        if env.service != "ledger":
            return _ignore
        return {
            _RESERVED: self._reserved,
            _CAPTURED: self._captured,
            _RELEASED: self._released,
        }.get(env.event_type, _ignore)

    def add(self, env: Envelope, payload: Message) -> None:
        self.handler(env)(env.stream_id, env.stream_version, payload)

    def _order(self, order_id: str) -> _Order:
        order = self.orders.get(order_id)
        if order is None:
            order = self.orders[order_id] = _Order()
        return order

    def _reserved(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.SubsidyReserved)
        order = self._order(payload.order_id)
        order.sku, order.merchant_id, order.category = (
            payload.sku,
            payload.merchant_id,
            payload.category,
        )
        order.unit_price_fen, order.subsidy_fen = payload.unit_price_fen, payload.subsidy_fen
        order.reserved = True

    def _captured(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.SubsidyCaptured)
        order = self._order(payload.order_id)
        order.captured = True
        if not order.reserved:  # the reservation's own figure wins when it is known
            order.subsidy_fen = payload.subsidy_fen

    def _released(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.SubsidyReleased)
        order = self._order(payload.order_id)
        if payload.was_captured:
            order.captured = order.refunded = True

    def table(self) -> Table:
        out: Table = {}
        for o in self.orders.values():
            if not o.captured:
                continue
            row = out.setdefault(
                (o.merchant_id, o.sku),
                dict.fromkeys(SALES_FIGURES, 0),
            )
            row["sold_units"] += 1
            row["sales_fen"] += o.unit_price_fen
            row["subsidy_fen"] += o.subsidy_fen
            if o.refunded:
                row["refunded_units"] += 1
                row["refunded_sales_fen"] += o.unit_price_fen
                row["refunded_subsidy_fen"] += o.subsidy_fen
        return out


SALES_FIGURES = (
    "sold_units",
    "sales_fen",
    "subsidy_fen",
    "refunded_units",
    "refunded_sales_fen",
    "refunded_subsidy_fen",
)


@dataclass
class _Batch:
    merchant_id: str
    period: tuple[str, str]  # from, to (RFC 3339)
    lines: dict[str, int]  # order -> subsidy fen
    deducted: dict[str, int]  # order -> clawback fen
    gross_fen: int
    clawback_fen: int
    net_fen: int
    approved: bool = False
    paid: bool = False


@dataclass(slots=True)
class _Sale:
    merchant_id: str = ""
    platform_id: str = ""
    sku: str = ""
    subsidy_fen: int = 0
    refunded: bool = False


@dataclass
class SettlementFold(Fold):
    """The merchants' settlement from the ledger's events: every batch (merchant, period,
    orders, gross, clawbacks deducted, net, status) and the returns ledger (each refund of a
    captured order: the batch that had paid it, its clawback, the batch that deducted that).

    It checks, as it folds, what the ledger's settlement promises (``settlement_domain``'s
    ``settled``, written again here from the events' meaning): an order in at most one batch,
    each clawback recorded once and deducted at most once and for what was recorded, every
    refund of a batched order clawed back, and per merchant every fen paid covered
    (:func:`services.invariants.check_paid_covered`)."""

    name: ClassVar[str] = "settlement"
    service: ClassVar[str] = "ledger"
    event_types: ClassVar[frozenset[str]] = frozenset(
        _name(m)
        for m in (
            ev.SubsidyReserved,
            ev.SubsidyReleased,
            ev.SettlementBatchCreated,
            ev.SettlementBatchApproved,
            ev.SettlementBatchPaid,
            ev.ClawbackRecorded,
        )
    )
    batches: dict[str, _Batch] = field(default_factory=dict)
    sales: dict[str, _Sale] = field(default_factory=dict)  # order -> what its refund lists
    batch_of: dict[str, str] = field(default_factory=dict)  # order -> the batch that paid it
    clawed: dict[str, tuple[int, str]] = field(default_factory=dict)  # order -> (fen, batch)
    deducted_by: dict[str, str] = field(default_factory=dict)  # order -> deducting batch
    violations: list[str] = field(default_factory=list)

    def wants(self, env: Envelope) -> bool:
        return env.service == "ledger" and env.event_type in self.event_types

    def handler(self, env: Envelope) -> Handler:
        return self._reserved if env.event_type == _RESERVED else self._other

    def add(self, env: Envelope, payload: Message) -> None:
        self.handler(env)(env.stream_id, env.stream_version, payload)

    def _reserved(self, stream: str, version: int, payload: Message) -> None:
        assert isinstance(payload, ev.SubsidyReserved)
        sale = self.sales.get(payload.order_id)
        if sale is None:
            sale = self.sales[payload.order_id] = _Sale()
        sale.merchant_id, sale.platform_id = payload.merchant_id, payload.platform_id
        sale.sku, sale.subsidy_fen = payload.sku, payload.subsidy_fen

    def _other(self, stream: str, version: int, payload: Message) -> None:
        if isinstance(payload, ev.SubsidyReleased):
            if payload.was_captured:
                self.sales.setdefault(payload.order_id, _Sale()).refunded = True
        elif isinstance(payload, ev.SettlementBatchCreated):
            self._created(payload)
        elif isinstance(payload, ev.SettlementBatchApproved | ev.SettlementBatchPaid):
            batch = self.batches.get(payload.batch_id)
            if batch is None:
                self.violations.append(f"batch {payload.batch_id} changed before it was created")
                return
            batch.approved = True
            batch.paid = batch.paid or isinstance(payload, ev.SettlementBatchPaid)
        elif isinstance(payload, ev.ClawbackRecorded):
            if payload.order_id in self.clawed:
                self.violations.append(f"two clawbacks of order {payload.order_id}")
            self.clawed[payload.order_id] = (payload.fen, payload.batch_id)

    def _created(self, e: ev.SettlementBatchCreated) -> None:
        # The merchant's stream orders a clawback before the batch that deducts it.
        for line in e.lines:
            if line.order_id in self.batch_of:
                self.violations.append(f"order {line.order_id} in two batches")
            self.batch_of[line.order_id] = e.batch_id
        for c in e.clawbacks:
            recorded = self.clawed.get(c.order_id)
            if c.order_id in self.deducted_by or recorded is None or recorded[0] != c.fen:
                self.violations.append(f"clawback of {c.order_id} deducted wrongly")
            self.deducted_by[c.order_id] = e.batch_id
        self.batches[e.batch_id] = _Batch(
            e.merchant_id,
            (e.period_from.ToJsonString(), e.period_to.ToJsonString()),
            {line.order_id: line.subsidy_fen for line in e.lines},
            {c.order_id: c.fen for c in e.clawbacks},
            e.gross_fen,
            e.clawback_fen,
            e.net_fen,
        )

    def merchants(self) -> dict[str, MerchantSettled]:
        """Per merchant, what its paid batches add up to (``settlement_domain.settled``)."""
        refunded = {o for o, sale in self.sales.items() if sale.refunded}
        out: dict[str, MerchantSettled] = {}
        for _, b in sorted(self.batches.items()):
            if not b.paid:
                continue
            before = out.get(b.merchant_id, MerchantSettled(0, 0, 0, 0))
            out[b.merchant_id] = MerchantSettled(
                before.paid + b.net_fen,
                before.unrefunded + sum(f for o, f in b.lines.items() if o not in refunded),
                before.clawed + sum(self.clawed[o][0] for o in b.lines if o in refunded),
                before.deducted + sum(b.deducted.values()),
            )
        return out

    def check(self) -> None:
        """Raise InvariantViolation for the first settlement promise the events break."""
        if self.violations:
            raise InvariantViolation(self.violations[0])
        refunded = {o for o, sale in self.sales.items() if sale.refunded}
        if missing := sorted((self.batch_of.keys() & refunded) - self.clawed.keys()):
            raise InvariantViolation(f"refunds of batched orders without a clawback: {missing}")
        for merchant_id, figures in sorted(self.merchants().items()):
            check_paid_covered(merchant_id, figures)

    def table(self) -> Table:
        self.check()
        return batch_table(
            (batch_id, b.merchant_id, *b.period, b.lines, b.deducted, figures(b))
            for batch_id, b in self.batches.items()
        )

    def returns(self) -> Table:
        """The returns ledger: each refund of a captured order (as ``ListReturns`` lists it)."""
        out: Table = {}
        for order_id, sale in self.sales.items():
            if not sale.refunded:
                continue
            out[
                return_key(
                    order_id,
                    sale.merchant_id,
                    sale.platform_id,
                    sale.sku,
                    self.batch_of.get(order_id, ""),
                    self.deducted_by.get(order_id, ""),
                )
            ] = return_figures(sale.subsidy_fen, clawed_back=order_id in self.clawed)
        return out


def figures(b: _Batch) -> dict[str, int]:
    """A batch's figures (its status as two flags: approved, paid)."""
    return {
        "orders": len(b.lines),
        "gross_fen": b.gross_fen,
        "clawbacks": len(b.deducted),
        "clawback_fen": b.clawback_fen,
        "net_fen": b.net_fen,
        "approved": int(b.approved),
        "paid": int(b.paid),
    }


BatchRow = tuple[str, str, str, str, Mapping[str, int], Mapping[str, int], dict[str, int]]


def batch_table(batches: Iterable[BatchRow]) -> Table:
    """Batches as rows: ``(batch, merchant, period from, period to)`` with its figures, each
    order it pays ``(batch, "order", order)`` and each clawback it deducts ``(batch,
    "clawback", order)`` with its fen (the same for the log's and the ledger's batches)."""
    out: Table = {}
    for batch_id, merchant_id, start, end, lines, deducted, totals in batches:
        out[(batch_id, merchant_id, start, end)] = totals
        for order_id, fen in lines.items():
            out[(batch_id, "order", order_id)] = {"subsidy_fen": fen}
        for order_id, fen in deducted.items():
            out[(batch_id, "clawback", order_id)] = {"fen": fen}
    return out


def return_key(
    order_id: str, merchant_id: str, platform_id: str, sku: str, batch_id: str, deducted_by: str
) -> Key:
    """A refund's row in the returns ledger: the order, whose it was, the batch that had paid
    it and the batch that deducted its clawback ("" for none)."""
    return (order_id, merchant_id, platform_id, sku, batch_id or "-", deducted_by or "-")


def return_figures(subsidy_fen: int, *, clawed_back: bool) -> dict[str, int]:
    """A refund's figures: its subsidy, and whether a clawback was recorded for it (its fen is
    in the batch that deducts it)."""
    return {"subsidy_fen": subsidy_fen, "clawed_back": int(clawed_back)}


@dataclass
class ReturnsFold(Fold):
    """The returns ledger (退换货台账), read from the :class:`SettlementFold` it follows
    (one fold of the events, two tables)."""

    name: ClassVar[str] = "returns"
    service: ClassVar[str] = "ledger"
    event_types: ClassVar[frozenset[str]] = frozenset()
    settlement: SettlementFold | None = None

    def wants(self, env: Envelope) -> bool:
        return False

    def table(self) -> Table:
        if self.settlement is None:
            return {}
        self.settlement.check()
        return self.settlement.returns()


def settlement_and_returns() -> list[Fold]:
    """The settlement fold and the returns ledger read from it."""
    settlement = SettlementFold()
    return [settlement, ReturnsFold(settlement)]


# Every kind of total, as a maker of its folds (two tables may share one fold of the events).
FOLDS: tuple[Callable[[], list[Fold]], ...] = (
    lambda: [PoolFold()],
    lambda: [QuotaFold()],
    lambda: [PersonFold()],
    lambda: [SalesFold()],
    settlement_and_returns,
)


Arrival = Callable[[Envelope], None]
# Per (service, event type, kind of stream): the payload's parser (None: no fold reads the
# kind, whose events only hold their place in their stream's order), the handlers and the
# folds that read it (Fold.handler, Fold.add), and what is told of each one as it arrives.
Reader = tuple[
    Callable[[bytes], Message] | None, tuple[Handler, ...], tuple[Fold, ...], Arrival | None
]


class Rebuild:
    """All folds over the log: feed it every entry's envelope in log order, then read the
    tables. Each stream's events reach the folds in version order: an event that arrived
    before an earlier version of its stream (after a redelivery) waits for it, and whatever
    still waits at the end (a version the log lacks) follows in order.

    ``arrivals``: per event type, a function told of each such event as it arrives (in log
    order, before the folds, whatever its stream's order)."""

    def __init__(
        self, folds: Iterable[Fold] | None = None, arrivals: Mapping[str, Arrival] | None = None
    ) -> None:
        self.folds = list(folds) if folds is not None else [f for m in FOLDS for f in m()]
        self.arrivals = dict(arrivals or {})
        self._next: dict[tuple[str, str], int] = {}  # each stream's next version
        self._held: dict[tuple[str, str], dict[int, Envelope]] = defaultdict(dict)
        self._readers: dict[tuple[str, str, str], Reader] = {}

    def add_all(
        self, envelopes: Iterable[Envelope], by_service: Counter[str] | None = None
    ) -> None:
        """:meth:`add` each one, in order, and count them per service in ``by_service``: the
        usual case (its stream's next version, nothing held) inline, as :meth:`add` and
        :meth:`_apply` take it (the replay's hot loop: each envelope's fields read once, each
        kind's parser, handlers and folds looked up once)."""
        following, held, readers = self._next, self._held, self._readers
        counts: dict[str, int] = {}
        for env in envelopes:
            service, stream, event_type = env.service, env.stream_id, env.event_type
            counts[service] = counts.get(service, 0) + 1
            kind = (service, event_type, stream.partition("/")[0])
            found = readers.get(kind)
            if found is None:
                found = self._reader(kind, env)
            parse, handlers, folds, arrival = found
            if arrival is not None:
                arrival(env)
            key = (service, stream)
            version = env.stream_version
            expected = following.get(key, 1)
            if version != expected or key in held:
                self._in_order(env)
                continue
            if parse is not None:
                payload = parse(env.payload)
                for handle in handlers:
                    handle(stream, version, payload)
                for f in folds:
                    f.add(env, payload)
            following[key] = expected + 1
        if by_service is not None:
            by_service.update(counts)

    def add(self, env: Envelope) -> None:
        """The log's next entry's envelope."""
        arrival = self._found(env)[3]
        if arrival is not None:
            arrival(env)
        self._in_order(env)

    def _in_order(self, env: Envelope) -> None:
        key, version = (env.service, env.stream_id), env.stream_version
        expected = self._next.get(key, 1)
        if version == expected and key not in self._held:  # the usual case: the next one
            self._apply(env)
            self._next[key] = expected + 1
            return
        held = self._held.get(key)
        if version < expected or (held is not None and version in held):
            for f in self.folds:
                f.repeated(env)
        elif version > expected:
            self._held[key][version] = env
        else:
            self._apply(env)
            expected += 1
            while held and expected in held:
                self._apply(held.pop(expected))
                expected += 1
            if held is not None and not held:
                del self._held[key]
            self._next[key] = expected

    def _found(self, env: Envelope) -> Reader:
        kind = (env.service, env.event_type, env.stream_id.partition("/")[0])
        found = self._readers.get(kind)
        return self._reader(kind, env) if found is None else found

    def _apply(self, env: Envelope) -> None:
        parse, handlers, folds, _ = self._found(env)
        if parse is not None:
            payload = parse(env.payload)
            stream, version = env.stream_id, env.stream_version
            for handle in handlers:
                handle(stream, version, payload)
            for f in folds:
                f.add(env, payload)

    def _reader(self, kind: tuple[str, str, str], env: Envelope) -> Reader:
        handlers: list[Handler] = []
        folds: list[Fold] = []
        for f in self.folds:
            if f.wants(env):
                handle = f.handler(env)
                if handle is None:
                    folds.append(f)
                elif handle is not _ignore:
                    handlers.append(handle)
        parse = _payload_class(env.event_type).FromString if handlers or folds else None
        found = self._readers[kind] = (
            parse,
            tuple(handlers),
            tuple(folds),
            self.arrivals.get(env.event_type),
        )
        return found

    def finish(self) -> dict[str, Fold]:
        """Hand over what still waits, each stream in version order; the folds by name."""
        for held in self._held.values():
            for version in sorted(held):
                self._apply(held[version])
        self._held.clear()
        return {f.name: f for f in self.folds}
