"""What the fund-monitoring dashboard shows, folded from the audit log: pure, no I/O.

The dashboard follows the audit log (every event of every service, in the order it reached
audit) and keeps, per budget pool, the burn-down (each funding source's available money and each
category's use after every pool event, through the ledger's own budget fold
:mod:`services.kernel.contract.budget`), the reservations by outcome, and, per campaign day and
category, the qualifications claimed; and the alerts the services raised
(``BudgetThresholdReached``). The pools' current figures come from the ledger itself
(``GetBudget``), not from here: the log may lag the ledger by a moment.

Money is integer fen everywhere; :func:`yuan` formats it for people with integer arithmetic
only (no float ever holds an amount).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from services.audit.totals import Rebuild
from services.audit.whatif import WhatIf, WhatIfFold, replay
from services.invariants import InvariantViolation
from services.kernel.contract import budget
from services.kernel.contract.budget import POOL_STREAM_PREFIX
from services.kernel.events import Envelope, payload_of
from subsidy.v1 import events_pb2 as ev

# At most this many burn-down points per pool are kept: past it every other point is dropped
# (the latest always kept), so a long campaign costs bounded memory and chart size.
MAX_POINTS = 400
MAX_ALERTS = 50


def yuan(fen: int) -> str:
    """``fen`` as yuan with a thousands separator and two decimals: 123456789 → "1,234,567.89".

    Integer division only, so no amount is ever rounded through a float."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def money(fen: int) -> dict[str, Any]:
    """An amount as the page receives it: the exact fen and the yuan text to show."""
    return {"fen": fen, "yuan": yuan(fen)}


def percent_bp(bp: int) -> str:
    """Basis points as a percentage text: 9500 → "95%", 1250 → "12.5%"."""
    whole, rest = divmod(bp, 100)
    return f"{whole}%" if rest == 0 else f"{whole}.{rest:02d}".rstrip("0") + "%"


@dataclass(frozen=True)
class BurnPoint:
    """A pool after one of its events: when, what is available in all and per source, and what
    each category holds or has spent (reserved + spent)."""

    at_ms: int
    available: int
    sources: tuple[tuple[str, int], ...]
    categories: tuple[tuple[str, int], ...]


@dataclass
class Outcomes:
    """A pool's reservations by outcome: counts and fen."""

    counts: Counter[str] = field(default_factory=Counter)
    fen: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: str, amount: int) -> None:
        self.counts[outcome] += 1
        self.fen[outcome] += amount


@dataclass
class PoolTrail:
    """One pool as the log tells it; a pool split into shards is one trail, each shard's
    stream folded in its own version order and the figures summed over the shards."""

    pool_id: str
    shards: dict[int, budget.Pool] = field(default_factory=dict)
    # Per shard: the next version to fold, and the events logged ahead of it.
    next_version: dict[int, int] = field(default_factory=dict)
    waiting: dict[int, dict[int, tuple[Envelope, Message]]] = field(default_factory=dict)
    legacy: dict[str, budget.Parts] = field(default_factory=dict)
    used: Counter[str] = field(default_factory=Counter)  # per category: reserved + spent, fen
    order_category: dict[str, str] = field(default_factory=dict)
    points: list[BurnPoint] = field(default_factory=list)
    outcomes: Outcomes = field(default_factory=Outcomes)
    broken: str = ""  # why the fold stopped (an invariant violation), shown as an alert

    @property
    def pool(self) -> budget.Pool:
        """The pool's figures: its one shard's, or every shard's summed."""
        if len(self.shards) == 1:
            return next(iter(self.shards.values()))
        return budget.total(self.pool_id, (self.shards[k] for k in sorted(self.shards)))


@dataclass(frozen=True)
class Alert:
    """Something a person should look at."""

    at: str  # ISO 8601, UTC
    kind: str
    text: str
    pool_id: str = ""

    def as_json(self) -> dict[str, str]:
        return {"at": self.at, "kind": self.kind, "text": self.text, "pool_id": self.pool_id}


def _iso(env: Envelope) -> str:
    return env.occurred_at.ToDatetime(dt.UTC).isoformat(timespec="seconds")


@dataclass
class LogFold:
    """Everything the dashboard derives from the audit log, fed one entry at a time."""

    pools: dict[str, PoolTrail] = field(default_factory=dict)
    claims: Counter[tuple[str, str]] = field(default_factory=Counter)  # (day, category)
    alerts: deque[Alert] = field(default_factory=lambda: deque(maxlen=MAX_ALERTS))
    seen: int = 0  # entries folded so far (the next GetEntries start)
    # The policy what-if's fold, fed the same entries (no second download of the log); the
    # versions drafted and those published, to show the drafts still awaiting approval.
    whatif: WhatIfFold = field(default_factory=WhatIfFold)
    drafted: list[str] = field(default_factory=list)
    published: set[str] = field(default_factory=set)
    _rebuild: Rebuild | None = None
    _panels: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def add(self, env: Envelope) -> None:
        """Fold the log's next entry."""
        self.seen += 1
        if self._rebuild is None:
            self._rebuild = Rebuild([self.whatif])
        self._rebuild.add(env)  # each stream in version order, as the CLI's what-if reads it
        try:
            payload = payload_of(env)
        except KeyError:  # an event type this build does not know: nothing here counts it
            return
        if isinstance(payload, ev.PolicyDrafted) and payload.version not in self.drafted:
            self.drafted.append(payload.version)
        elif isinstance(payload, ev.PolicyPublished):
            self.published.add(payload.version)
        if isinstance(payload, ev.QualificationClaimed):
            self.claims[(payload.quota_day, payload.category)] += 1
        elif isinstance(payload, ev.BudgetThresholdReached):
            where = f"category {payload.category}" if payload.category else "the pool"
            self.alerts.append(
                Alert(
                    _iso(env),
                    "budget threshold",
                    f"{payload.pool_id}: {where} has spent {percent_bp(payload.threshold_bp)}"
                    f" ({yuan(payload.spent_fen)} of {yuan(payload.base_fen)} yuan)",
                    payload.pool_id,
                )
            )
        if env.service == "ledger" and env.stream_id.startswith(POOL_STREAM_PREFIX):
            self._pool_event(env, payload)

    def _pool_event(self, env: Envelope, payload: Message) -> None:
        pool_id, shard = budget.stream_shard(env.stream_id)
        trail = self.pools.get(pool_id)
        if trail is None:
            trail = self.pools[pool_id] = PoolTrail(pool_id)
        if shard not in trail.shards:
            trail.shards[shard] = budget.Pool(pool_id)
            trail.next_version[shard] = 1
            trail.waiting[shard] = {}
        if env.stream_version < trail.next_version[shard]:
            return  # logged twice (audit verify reports it); counted once here
        # The log's order is arrival order; a shard's stream is folded in version order.
        waiting = trail.waiting[shard]
        waiting[env.stream_version] = (env, payload)
        while trail.next_version[shard] in waiting and not trail.broken:
            self._step(trail, shard, *waiting.pop(trail.next_version[shard]))
            trail.next_version[shard] += 1

    def _step(self, trail: PoolTrail, shard: int, env: Envelope, payload: Message) -> None:
        order_id = getattr(payload, "order_id", "")
        try:
            trail.shards[shard], parts = budget.step(
                trail.shards[shard], payload, trail.legacy.get(order_id)
            )
        except InvariantViolation as exc:
            trail.broken = str(exc)
            self.alerts.append(Alert(_iso(env), "invariant", str(exc), trail.pool_id))
            return
        if isinstance(payload, ev.SubsidyReserved):
            if not payload.sources:
                trail.legacy[order_id] = parts
            trail.order_category[order_id] = payload.category
            trail.used[payload.category] += payload.subsidy_fen
            trail.outcomes.add("reserved", payload.subsidy_fen)
        elif isinstance(payload, ev.SubsidyCaptured):
            trail.outcomes.add("captured", payload.subsidy_fen)
        elif isinstance(payload, ev.SubsidyReleased):
            trail.legacy.pop(order_id, None)
            category = payload.category or trail.order_category.get(order_id, "")
            trail.order_category.pop(order_id, None)
            trail.used[category] -= payload.subsidy_fen
            captured = "after capture" if payload.was_captured else "before capture"
            outcome = f"released {payload.reason or 'UNKNOWN'} ({captured})"
            trail.outcomes.add(outcome, payload.subsidy_fen)
        elif isinstance(payload, ev.ReservationRefused):
            trail.outcomes.add(f"refused {payload.reason}", 0)
        elif not isinstance(payload, ev.BudgetFunded | ev.TrancheReleased):
            return  # proposals, approvals, thresholds: no money moves
        self._point(trail, env)

    def _point(self, trail: PoolTrail, env: Envelope) -> None:
        pool = trail.pool
        trail.points.append(
            BurnPoint(
                at_ms=env.occurred_at.seconds * 1000 + env.occurred_at.nanos // 1_000_000,
                available=pool.available,
                sources=tuple((s.source or "(unnamed)", s.available) for s in pool.sources),
                categories=tuple(sorted((c, fen) for c, fen in trail.used.items() if c)),
            )
        )
        if len(trail.points) > MAX_POINTS:
            last = trail.points[-1]
            trail.points = [*trail.points[:-1:2], last]

    def drafts(self) -> list[str]:
        """The policy versions drafted in the log and not published (awaiting approval), in
        the order they were drafted."""
        return [v for v in self.drafted if v not in self.published]

    def whatif_panels(self) -> list[dict[str, Any]]:
        """Per draft awaiting approval, the what-if of the orders so far under it
        (:func:`whatif_panel`); each replayed again only when the log has grown."""
        out = []
        for version in self.drafts():
            policy = self.whatif.policies.get(version)
            if policy is None:  # its event is still held back for an earlier version
                continue
            cached = self._panels.get(version)
            if cached is None or cached[0] != self.seen:
                cached = self._panels[version] = (
                    self.seen,
                    whatif_panel(replay(self.whatif, policy)),
                )
            out.append(cached[1])
        for version in set(self._panels) - set(self.drafts()):
            del self._panels[version]  # approved meanwhile: no longer a draft to weigh
        return out

    def pending(self, pool_id: str) -> int:
        """Reservations of the pool neither captured nor released yet."""
        trail = self.pools.get(pool_id)
        if trail is None:
            return 0
        o = trail.outcomes.counts
        before = sum(n for k, n in o.items() if k.endswith("(before capture)"))
        return o["reserved"] - o["captured"] - before


def burn_down(trail: PoolTrail) -> dict[str, Any]:
    """A pool's burn-down series as the page draws them: one time axis, and per source (money
    available) and per category (money held or spent) one value per point, in fen."""
    points = trail.points
    sources = sorted({name for p in points for name, _ in p.sources})
    categories = sorted({name for p in points for name, _ in p.categories})
    return {
        "t_ms": [p.at_ms for p in points],
        "available": [p.available for p in points],
        "sources": {s: [dict(p.sources).get(s, 0) for p in points] for s in sources},
        "categories": {c: [dict(p.categories).get(c, 0) for p in points] for c in categories},
    }


def outcomes_json(fold: LogFold, pool_id: str) -> list[dict[str, Any]]:
    """A pool's reservations by outcome, pending first, for the page's table."""
    trail = fold.pools.get(pool_id)
    if trail is None:
        return []
    rows = [{"outcome": "pending", "count": fold.pending(pool_id), "amount": None}]
    for outcome in sorted(trail.outcomes.counts):
        fen = trail.outcomes.fen[outcome]
        rows.append(
            {
                "outcome": outcome,
                "count": trail.outcomes.counts[outcome],
                "amount": money(fen) if not outcome.startswith("refused") else None,
            }
        )
    return rows


def whatif_panel(result: WhatIf) -> dict[str, Any]:
    """A draft's what-if as the page draws it: the totals (actual and draft subsidy, their
    difference, orders the draft refuses), per day (all categories) the same figures, and per
    pool the burn-down at each day's end, actual against draft (available money, fen)."""
    summary = result.summary()
    days: dict[str, dict[str, int]] = {}
    for (day, _category), figures in result.days().items():
        row = days.setdefault(day, Counter())
        row.update(figures)
    burn: dict[str, dict[str, list[Any]]] = {}
    for (pool_id, day), figures in result.burn_down.items():
        series = burn.setdefault(pool_id, {"days": [], "actual": [], "draft": []})
        series["days"].append(day)
        series["actual"].append(figures["actual_available_fen"])
        series["draft"].append(figures["draft_available_fen"])
    return {
        "draft": result.draft,
        "timezone": result.timezone,
        "orders": summary["orders"],
        "actual": money(summary["actual_subsidy_fen"]),
        "draft_subsidy": money(summary["draft_subsidy_fen"]),
        "difference": money(summary["difference_fen"]),
        "refused": summary["refused_by_draft"],
        "days": [
            {
                "day": day,
                "orders": row["orders"],
                "actual": money(row["actual_subsidy_fen"]),
                "draft_subsidy": money(row["draft_subsidy_fen"]),
                "difference": money(row["difference_fen"]),
                "refused": row["refused_by_draft"],
            }
            for day, row in sorted(days.items())
        ],
        "burn_down": [{"pool_id": pool_id, **series} for pool_id, series in sorted(burn.items())],
        "not_replayed": summary["not_replayed"],
    }
