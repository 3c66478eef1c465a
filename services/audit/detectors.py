"""Post-hoc fraud detection over the event log, pure: detectors that read the events of every
service and report findings with their evidence, which supervision turns into cases.

Each detector is configured by data (:class:`DetectorRules`, from a YAML or JSON mapping the
operators keep: thresholds, windows, minimum counts), reads the events it needs through
:meth:`Detector.add` (each stream in version order, as :class:`~.totals.Rebuild` hands them
over) and answers :meth:`Detector.findings` at a given instant. A finding's ``key`` names what it
is about (the detector and its subject), so running the detectors again over a longer log finds
the same key again and a case is opened once.

- ``price_raise``: an order's unit price above the lowest list price its product's model (same
  merchant, brand and model, whatever the SKU) had in the baseline window, by more than the
  tolerance: a raise before the discount, or a product re-registered under a new SKU to reset
  its baseline (the finding says which);
- ``shared_serial``: one serial / IMEI on several subsidised orders (held or captured at once,
  or on several platforms);
- ``shared_address``: many people's subsidised orders to one delivery address (by its blind
  index) within a window;
- ``quick_refund``: subsidies refunded soon after their capture, per consumer and per merchant;
- ``missing_evidence``: captures without delivery or activation evidence past the deadline;
- ``merchant_anomaly``: a merchant's day whose average price or refund rate jumps against its
  own earlier days and against its category that day.

Only ids, amounts and blind indexes appear in a finding: the events hold nothing else.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any, ClassVar

from google.protobuf.message import Message

from services.kernel.events import Envelope
from subsidy.v1 import events_pb2 as ev

from .totals import Fold, Rebuild, Table, _name

BP = 10_000


@dataclass(frozen=True)
class DetectorRules:
    """Every detector's thresholds (operators' data; the defaults are a starting point).

    Windows are in seconds or days as named; ``*_bp`` are basis points (10000 = 100 %)."""

    price_tolerance_bp: int = 1000  # above the model's lowest price in the window by > 10 %
    price_window_days: int = 30
    serial_min_orders: int = 2
    quick_refund_s: int = 86_400  # refunded within a day of its capture
    quick_refund_min_per_consumer: int = 2
    quick_refund_min_per_merchant: int = 3
    evidence_days: int = 30
    anomaly_min_orders: int = 5  # a merchant's day with fewer orders is not judged
    anomaly_price_jump_bp: int = 15_000  # average price 1.5x its own earlier days' and category's
    anomaly_refund_rate_bp: int = 3000  # refund rate 30 points above its own and category's
    anomaly_sigma: int = 4  # and the average price that many standard errors above its own
    anomaly_refund_one_in: int = 1_000_000  # and the refunds that unlikely at its own rate
    address_min_people: int = 5  # consumers with subsidised orders to one delivery address
    address_window_days: int = 30

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> DetectorRules:
        """The rules a mapping names (the others at their defaults); an unknown name or a value
        that is not a positive whole number is refused with its name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"detector rules: unknown {', '.join(unknown)}")
        values: dict[str, int] = {}
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**9:
                raise ValueError(f"detector rules: {name} must be a whole number 1..1000000000")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class Finding:
    """One suspicion with its evidence: what a case is opened with."""

    detector: str
    subject_kind: str  # order, serial, consumer, merchant
    subject: str
    reason: str
    at: dt.datetime  # when the evidence was complete (the event that made it a finding)
    evidence: tuple[tuple[str, str], ...]  # (name, value), ids and amounts only

    @property
    def key(self) -> str:
        """What the finding is about; the same suspicion found again has the same key."""
        return f"{self.detector}/{self.subject_kind}/{self.subject}/{self.reason}"

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "detector": self.detector,
            "subject_kind": self.subject_kind,
            "subject": self.subject,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "evidence": dict(self.evidence),
        }


class Detector(Fold):
    """A detector reads events like a total's fold does; its answer is findings."""

    def __init__(self, rules: DetectorRules) -> None:
        self.rules = rules

    def findings(self, now: dt.datetime) -> list[Finding]:
        raise NotImplementedError

    def table(self) -> Table:
        return {}


def _at(env: Envelope) -> dt.datetime:
    return env.occurred_at.ToDatetime(tzinfo=dt.UTC)


def _types(*messages: type[Message]) -> frozenset[str]:
    return frozenset(_name(m) for m in messages)


@dataclass
class _Order:
    order_id: str
    at: dt.datetime
    consumer_id: str = ""
    merchant_id: str = ""
    category: str = ""
    platform_id: str = ""
    sku: str = ""
    serial: str = ""
    unit_price_fen: int = 0
    subsidy_fen: int = 0
    captured_at: dt.datetime | None = None
    released_at: dt.datetime | None = None
    refunded: bool = False
    evidenced: bool = False
    reserved: bool = False
    address: str = ""  # the delivery address's blind index ("" if the platform gave none)


class Orders(Detector):
    """The orders as the ledger's events tell them: what most detectors read."""

    event_types: ClassVar[frozenset[str]] = _types(
        ev.SubsidyReserved, ev.SubsidyCaptured, ev.SubsidyReleased, ev.EvidenceRecorded
    )
    service: ClassVar[str] = "ledger"

    def __init__(self, rules: DetectorRules) -> None:
        super().__init__(rules)
        self.orders: dict[str, _Order] = {}

    def wants(self, env: Envelope) -> bool:
        return env.service == "ledger" and env.event_type in self.event_types

    def add(self, env: Envelope, payload: Message) -> None:
        # An order's events may sit in different streams (its evidence is not in the pool's),
        # so they can reach the log in any order: the record is made by whichever comes first.
        order_id = str(getattr(payload, "order_id", ""))
        o = self.orders.get(order_id)
        if o is None:
            o = self.orders[order_id] = _Order(order_id, _at(env))
        if isinstance(payload, ev.SubsidyReserved):
            o.at = _at(env)
            o.consumer_id, o.merchant_id, o.category = (
                payload.consumer_id,
                payload.merchant_id,
                payload.category,
            )
            o.platform_id, o.sku, o.serial = payload.platform_id, payload.sku, payload.serial
            o.unit_price_fen, o.subsidy_fen = payload.unit_price_fen, payload.subsidy_fen
            o.address = payload.circumstance_indexes.get("address", "")
            o.reserved = True
        elif isinstance(payload, ev.SubsidyCaptured):
            o.captured_at = _at(env)
        elif isinstance(payload, ev.SubsidyReleased):
            o.released_at, o.refunded = _at(env), payload.was_captured
        elif isinstance(payload, ev.EvidenceRecorded):
            o.evidenced = True

    def reserved(self) -> list[_Order]:
        """The orders whose reservation the log holds."""
        return [o for o in self.orders.values() if o.reserved]


class PriceRaise(Detector):
    """Unit prices above the lowest list price of the product's model in the window."""

    name: ClassVar[str] = "price_raise"
    service: ClassVar[str] = "catalog"
    event_types: ClassVar[frozenset[str]] = _types(
        ev.ProductRegistered, ev.ProductPriceChanged, ev.SubsidyReserved
    )

    def __init__(self, rules: DetectorRules) -> None:
        super().__init__(rules)
        self.model_of: dict[str, tuple[str, str, str]] = {}  # sku -> (merchant, brand, model)
        self.prices: dict[tuple[str, str, str], list[tuple[dt.datetime, str, int]]] = {}
        self.reserved: list[tuple[dt.datetime, ev.SubsidyReserved]] = []

    def wants(self, env: Envelope) -> bool:
        return env.event_type in self.event_types and env.service in ("catalog", "ledger")

    def add(self, env: Envelope, payload: Message) -> None:
        if isinstance(payload, ev.ProductRegistered):
            model = (payload.merchant_id, payload.brand, payload.model)
            self.model_of[payload.sku] = model
            self.prices.setdefault(model, []).append(
                (_at(env), payload.sku, payload.list_price_fen)
            )
        elif isinstance(payload, ev.ProductPriceChanged):
            model_key = self.model_of.get(payload.sku)
            if model_key is not None:
                self.prices[model_key].append((_at(env), payload.sku, payload.new_price_fen))
        elif isinstance(payload, ev.SubsidyReserved):
            self.reserved.append((_at(env), payload))

    def findings(self, now: dt.datetime) -> list[Finding]:
        out: list[Finding] = []
        window = dt.timedelta(days=self.rules.price_window_days)
        for at, r in self.reserved:
            model = self.model_of.get(r.sku)
            if model is None:
                continue
            history = sorted(self.prices[model])
            lowest = _lowest_in_force(history, at - window, at)
            if lowest is None:
                continue
            low_fen, low_sku = lowest
            if r.unit_price_fen * BP <= low_fen * (BP + self.rules.price_tolerance_bp):
                continue
            reason = "PRICE_RAISED" if low_sku == r.sku else "BASELINE_RESET_BY_NEW_SKU"
            rise_bp = (r.unit_price_fen - low_fen) * BP // low_fen
            out.append(
                Finding(
                    self.name,
                    "order",
                    r.order_id,
                    reason,
                    at,
                    (
                        ("sku", r.sku),
                        ("merchant_id", r.merchant_id),
                        ("unit_price_fen", str(r.unit_price_fen)),
                        ("lowest_price_fen", str(low_fen)),
                        ("lowest_price_sku", low_sku),
                        ("rise_bp", str(rise_bp)),
                    ),
                )
            )
        return out


def _lowest_in_force(
    history: list[tuple[dt.datetime, str, int]], start: dt.datetime, end: dt.datetime
) -> tuple[int, str] | None:
    """The lowest price any SKU of the model had in force during [start, end]: (fen, sku).
    Each SKU's price holds from when it was set until its next one."""
    by_sku: dict[str, list[tuple[dt.datetime, int]]] = defaultdict(list)
    for at, sku, fen in history:
        if at <= end:
            by_sku[sku].append((at, fen))
    best: tuple[int, str] | None = None
    for sku, prices in by_sku.items():
        for i, (_set_at, fen) in enumerate(prices):
            until = prices[i + 1][0] if i + 1 < len(prices) else end
            if until >= start and (best is None or fen < best[0]):
                best = (fen, sku)
    return best


class SharedSerial(Orders):
    """One serial on several orders at once, or on several platforms."""

    name: ClassVar[str] = "shared_serial"

    def findings(self, now: dt.datetime) -> list[Finding]:
        by_serial: dict[str, list[_Order]] = defaultdict(list)
        for o in self.reserved():
            if o.serial:
                by_serial[o.serial].append(o)
        out = []
        for serial, orders in sorted(by_serial.items()):
            orders.sort(key=lambda o: (o.at, o.order_id))
            platforms = {o.platform_id for o in orders}
            overlapping = [
                o for o in orders if any(_overlap(o, other) for other in orders if other is not o)
            ]
            if len(platforms) > 1 and len(orders) >= self.rules.serial_min_orders:
                reason = "SERIAL_ON_SEVERAL_PLATFORMS"
            elif len(overlapping) >= self.rules.serial_min_orders:
                reason = "SERIAL_ON_SEVERAL_ORDERS"
            else:
                continue
            out.append(
                Finding(
                    self.name,
                    "serial",
                    serial,
                    reason,
                    orders[-1].at,
                    (
                        ("orders", ",".join(o.order_id for o in orders)),
                        ("platforms", ",".join(sorted(platforms))),
                    ),
                )
            )
        return out


def _overlap(a: _Order, b: _Order) -> bool:
    """Whether two orders held or kept the same unit's subsidy at the same time (a refund or a
    cancellation before the other order frees the unit for a new sale)."""
    a_end = a.released_at or dt.datetime.max.replace(tzinfo=dt.UTC)
    b_end = b.released_at or dt.datetime.max.replace(tzinfo=dt.UTC)
    return a.at < b_end and b.at < a_end


class SharedAddress(Orders):
    """Many people's subsidised orders delivered to one address within a window: one address
    collecting subsidies for many (the address by its blind index; the value is in no event)."""

    name: ClassVar[str] = "shared_address"

    def findings(self, now: dt.datetime) -> list[Finding]:
        window = dt.timedelta(days=self.rules.address_window_days)
        by_address: dict[str, list[_Order]] = defaultdict(list)
        for o in self.reserved():
            if o.address and o.captured_at is not None:
                by_address[o.address].append(o)
        out = []
        for address, orders in sorted(by_address.items()):
            orders.sort(key=lambda o: (o.at, o.order_id))
            start, best = 0, (0, 0, 0)  # (people, first, last) of the fullest window
            inside: Counter[str] = Counter()  # each consumer's orders in the window
            for end, o in enumerate(orders):
                inside[o.consumer_id] += 1
                while o.at - orders[start].at > window:
                    gone = orders[start].consumer_id
                    inside[gone] -= 1
                    if not inside[gone]:
                        del inside[gone]
                    start += 1
                if len(inside) > best[0]:
                    best = (len(inside), start, end)
            people, first, last = best
            if people < self.rules.address_min_people:
                continue
            shown = orders[first : last + 1]
            out.append(
                Finding(
                    self.name,
                    "address",
                    address,
                    "MANY_PEOPLE_AT_ONE_ADDRESS",
                    shown[-1].at,
                    (
                        ("people", str(people)),
                        ("orders", ",".join(o.order_id for o in shown)),
                        ("subsidy_fen", str(sum(o.subsidy_fen for o in shown))),
                    ),
                )
            )
        return out


class QuickRefund(Orders):
    """Subsidies refunded soon after their capture: a consumer or a merchant that does it
    often is cashing the discount, not buying."""

    name: ClassVar[str] = "quick_refund"

    def findings(self, now: dt.datetime) -> list[Finding]:
        limit = dt.timedelta(seconds=self.rules.quick_refund_s)
        quick = [
            o
            for o in self.reserved()
            if o.refunded
            and o.captured_at
            and o.released_at
            and o.released_at - o.captured_at <= limit
        ]
        out = []
        for kind, minimum in (
            ("consumer", self.rules.quick_refund_min_per_consumer),
            ("merchant", self.rules.quick_refund_min_per_merchant),
        ):
            groups: dict[str, list[_Order]] = defaultdict(list)
            for o in quick:
                groups[o.consumer_id if kind == "consumer" else o.merchant_id].append(o)
            for subject, orders in sorted(groups.items()):
                if len(orders) < minimum:
                    continue
                orders.sort(key=lambda o: (o.at, o.order_id))
                last = max(o.released_at or o.at for o in orders)
                out.append(
                    Finding(
                        self.name,
                        kind,
                        subject,
                        "QUICK_REFUNDS",
                        last,
                        (
                            ("orders", ",".join(o.order_id for o in orders)),
                            ("count", str(len(orders))),
                            ("subsidy_fen", str(sum(o.subsidy_fen for o in orders))),
                        ),
                    )
                )
        return out


class MissingEvidence(Orders):
    """Captured, unrefunded orders with no delivery or activation evidence past the deadline,
    per merchant."""

    name: ClassVar[str] = "missing_evidence"

    def findings(self, now: dt.datetime) -> list[Finding]:
        limit = dt.timedelta(days=self.rules.evidence_days)
        late: dict[str, list[_Order]] = defaultdict(list)
        for o in self.reserved():
            if o.captured_at and not o.refunded and not o.evidenced and o.captured_at + limit < now:
                late[o.merchant_id].append(o)
        out = []
        for merchant, orders in sorted(late.items()):
            orders.sort(key=lambda o: (o.at, o.order_id))
            due = max(o.captured_at for o in orders if o.captured_at) + limit
            out.append(
                Finding(
                    self.name,
                    "merchant",
                    merchant,
                    "EVIDENCE_OVERDUE",
                    due,
                    (
                        ("orders", ",".join(o.order_id for o in orders)),
                        ("count", str(len(orders))),
                        ("subsidy_fen", str(sum(o.subsidy_fen for o in orders))),
                    ),
                )
            )
        return out


@dataclass
class _Day:
    orders: int = 0
    price_fen: int = 0
    price_sq: int = 0  # the sum of the squared prices (fen²), for the spread
    refunds: int = 0


class MerchantAnomaly(Orders):
    """A merchant's day against its own earlier days and against its category that day."""

    name: ClassVar[str] = "merchant_anomaly"

    def findings(self, now: dt.datetime) -> list[Finding]:
        mine: dict[tuple[str, str], dict[dt.date, _Day]] = defaultdict(lambda: defaultdict(_Day))
        category: dict[tuple[str, dt.date], _Day] = defaultdict(_Day)
        for o in self.reserved():
            if o.captured_at is None:
                continue
            day = o.at.date()
            for d in (mine[(o.merchant_id, o.category)][day], category[(o.category, day)]):
                d.orders += 1
                d.price_fen += o.unit_price_fen
                d.price_sq += o.unit_price_fen * o.unit_price_fen
                d.refunds += o.refunded
        out = []
        for (merchant, cat), days in sorted(mine.items()):
            ordered = sorted(days.items())
            for i, (day, d) in enumerate(ordered):
                if d.orders < self.rules.anomaly_min_orders or i == 0:
                    continue
                before = _merged(x for _, x in ordered[:i])
                peer = category[(cat, day)]
                others = _Day(
                    peer.orders - d.orders,
                    peer.price_fen - d.price_fen,
                    peer.price_sq - d.price_sq,
                    peer.refunds - d.refunds,
                )
                reason = self._judge(d, before, others)
                if reason:
                    out.append(
                        Finding(
                            self.name,
                            "merchant",
                            merchant,
                            reason,
                            dt.datetime.combine(day, dt.time.max, dt.UTC),
                            (
                                ("category", cat),
                                ("day", day.isoformat()),
                                ("orders", str(d.orders)),
                                ("average_price_fen", str(d.price_fen // d.orders)),
                                (
                                    "earlier_average_price_fen",
                                    str(before.price_fen // before.orders),
                                ),
                                ("refund_rate_bp", str(d.refunds * BP // d.orders)),
                            ),
                        )
                    )
        return out

    def _judge(self, d: _Day, before: _Day, others: _Day) -> str:
        """Why the day stands out, or "": against the merchant's own earlier days (by the
        ratio, and by more than ``anomaly_sigma`` standard errors of its own prices, so a
        merchant whose dear and cheap products sell in varying mix is not a finding) and, when
        the category has other sales that day, against them too (by the ratio)."""
        r = self.rules
        mean, own = Fraction(d.price_fen, d.orders), Fraction(before.price_fen, before.orders)
        variance = Fraction(before.price_sq, before.orders) - own * own
        jump = Fraction(r.anomaly_price_jump_bp, BP)
        rise = mean - own
        above_own = mean > own * jump and rise * rise * d.orders > r.anomaly_sigma**2 * variance
        above_peers = others.orders == 0 or mean > Fraction(others.price_fen, others.orders) * jump
        if above_own and above_peers:
            return "AVERAGE_PRICE_JUMP"
        rate = d.refunds * BP // d.orders
        usual = before.refunds * BP // before.orders
        peers = others.refunds * BP // others.orders if others.orders else 0
        if (
            rate - usual >= r.anomaly_refund_rate_bp
            and rate - peers >= r.anomaly_refund_rate_bp
            # as unlikely as 1 in anomaly_refund_one_in at the merchant's own rate (at least
            # one refund more than it had, so a merchant that never refunded is not certain)
            and _tail(d.orders, d.refunds, (before.refunds + 1) / (before.orders + 1))
            * r.anomaly_refund_one_in
            < 1
        ):
            return "REFUND_RATE_JUMP"
        return ""


def _tail(n: int, k: int, p: float) -> float:
    """P(at least ``k`` of ``n``) for a rate ``p``: how unlikely a day's refunds are. A
    probability, not money, so a float."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _merged(days: Iterable[_Day]) -> _Day:
    out = _Day()
    for d in days:
        out.orders += d.orders
        out.price_fen += d.price_fen
        out.price_sq += d.price_sq
        out.refunds += d.refunds
    return out


DETECTORS: tuple[type[Detector], ...] = (
    PriceRaise,
    SharedSerial,
    SharedAddress,
    QuickRefund,
    MissingEvidence,
    MerchantAnomaly,
)


def detectors(rules: DetectorRules) -> list[Detector]:
    """One of each detector, with ``rules``."""
    return [d(rules) for d in DETECTORS]


def detect(envs: Iterable[Envelope], rules: DetectorRules, now: dt.datetime) -> list[Finding]:
    """Every detector over ``envs`` (the log, in any order: each stream is replayed in order);
    the findings sorted by key."""
    found = detectors(rules)
    rebuild = Rebuild(found)
    for env in envs:
        rebuild.add(env)
    rebuild.finish()
    return sorted((f for d in found for f in d.findings(now)), key=lambda f: f.key)
