"""Policy what-if: the real history of orders replayed under a draft policy, pure.

``subsidyctl policy whatif --draft VERSION`` reads the audit log's events (nothing else, and it
changes nothing), folds them with :class:`WhatIfFold` through :class:`~.totals.Rebuild` (each
stream in version order) and asks :func:`replay` what the draft would have done to every order
the ledger reserved: the subsidy it would have paid (the draft's quote of the same category,
grade and price), and whether it would have refused the order, for the draft's rules or because
its budget would have run out first. The budget is replayed pool by pool in the pool stream's
own order, with the ledger's own funding checks (:mod:`services.kernel.contract.funds`) and the
draft's funding rules, so the what-if of the policy the orders were made under reproduces what
happened to the fen (that is the test of the replay).

What it cannot see, and says so in its answer: orders the platform never reserved (refused at
verification, or by claim-time rules: the window, the region, quotas and per-person limits),
which a laxer draft might have admitted; and a draft's claim-time rules themselves.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from google.protobuf.message import Message

from services.kernel.contract import budget
from services.kernel.contract.budget import POOL_STREAM_PREFIX, parts_message
from services.kernel.contract.funds import CategoryUse, check_funds, evolve_use
from services.kernel.contract.policy import Policy, quote
from services.kernel.contract.policy_proto import policy_of
from services.kernel.errors import DomainError
from services.kernel.events import Envelope
from subsidy.v1 import events_pb2 as ev

from .totals import Fold, Table, _name

CAPTURED, REFUNDED, RELEASED, PENDING = "CAPTURED", "REFUNDED", "RELEASED", "PENDING"
DAY_FIGURES = (
    "orders",
    "actual_paid_orders",
    "actual_subsidy_fen",
    "draft_paid_orders",
    "draft_subsidy_fen",
    "refused_by_draft",
    "difference_fen",
)


@dataclass
class WhatIfFold(Fold):
    """What a what-if needs from the log: every pool stream's events in version order, each
    product's efficiency grade, and every policy version drafted or published."""

    name: ClassVar[str] = "whatif"
    service: ClassVar[str] = "ledger"
    event_types: ClassVar[frozenset[str]] = frozenset(
        _name(m) for m in (ev.ProductRegistered, ev.PolicyDrafted, ev.PolicyPublished)
    )
    # Per pool and shard, that shard's events in its stream's order (as the log feeds them).
    shards: dict[str, dict[int, list[tuple[dt.datetime, Message]]]] = field(default_factory=dict)
    grades: dict[str, int | None] = field(default_factory=dict)  # sku -> grade (None: none)
    policies: dict[str, Policy] = field(default_factory=dict)

    def wants(self, env: Envelope) -> bool:
        if env.service == "ledger":
            return env.stream_id.startswith(POOL_STREAM_PREFIX)
        return env.service == "catalog" and env.event_type in self.event_types

    def add(self, env: Envelope, payload: Message) -> None:
        if isinstance(payload, ev.ProductRegistered):
            self.grades[payload.sku] = payload.grade or None
        elif isinstance(payload, ev.PolicyDrafted | ev.PolicyPublished):
            self.policies[payload.version] = policy_of(payload)
        elif env.service == "ledger":
            # A pool split into shards is weighed whole, as the draft would spend it: its
            # shards' events in the log's order, and the moves between shards (which change
            # no figure of the whole pool) left out.
            if isinstance(payload, _SHARD_MOVES):
                return
            pool_id, shard = budget.stream_shard(env.stream_id)
            at = env.occurred_at.ToDatetime(tzinfo=dt.UTC)
            self.shards.setdefault(pool_id, {}).setdefault(shard, []).append((at, payload))

    @property
    def pools(self) -> dict[str, list[tuple[dt.datetime, Message]]]:
        """Each pool's events: one shard's in its stream order, several shards' merged by when
        each occurred (each shard's own order kept), so the draft spends the whole pool's
        budget in the order the orders came."""
        out: dict[str, list[tuple[dt.datetime, Message]]] = {}
        for pool_id, shards in self.shards.items():
            runs = [shards[k] for k in sorted(shards)]
            out[pool_id] = (
                runs[0] if len(runs) == 1 else list(heapq.merge(*runs, key=lambda e: e[0]))
            )
        return out

    def table(self) -> Table:
        return {}


_SHARD_MOVES = (ev.ShardBudgetSent, ev.ShardBudgetReceived, ev.PoolSharded)


@dataclass
class Order:
    """One reserved order: what happened, and what the draft would have done."""

    order_id: str
    pool_id: str
    category: str
    sku: str
    day: str  # the reservation's day in the campaign's time zone (ISO date)
    unit_price_fen: int
    actual_fen: int
    in_period: bool
    status: str = PENDING  # CAPTURED, REFUNDED, RELEASED, PENDING (as it happened)
    draft_fen: int = 0  # what the draft reserved (0 when it refused)
    refused: str = ""  # why the draft would have refused it ("" if it would not)
    draft_parts: budget.Parts = ()

    @property
    def paid(self) -> bool:
        return self.status == CAPTURED

    def as_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "day": self.day,
            "category": self.category,
            "pool_id": self.pool_id,
            "status": self.status,
            "actual_subsidy_fen": self.actual_fen,
            "draft_subsidy_fen": self.draft_fen,
            "refused": self.refused,
        }


@dataclass
class WhatIf:
    """The what-if's answer: per day and category, per pool and day (the burn-down), and every
    order the draft would have refused or paid differently."""

    draft: str
    timezone: str
    orders: list[Order]
    burn_down: dict[tuple[str, str], dict[str, int]]  # (pool, day) -> figures at the day's end

    def days(self) -> dict[tuple[str, str], dict[str, int]]:
        """(day, category) -> DAY_FIGURES, over the orders in the period."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for o in self.orders:
            if not o.in_period:
                continue
            row = out.setdefault((o.day, o.category), dict.fromkeys(DAY_FIGURES, 0))
            row["orders"] += 1
            if o.paid:
                row["actual_paid_orders"] += 1
                row["actual_subsidy_fen"] += o.actual_fen
                if not o.refused:
                    row["draft_paid_orders"] += 1
                    row["draft_subsidy_fen"] += o.draft_fen
            if o.refused:
                row["refused_by_draft"] += 1
            row["difference_fen"] = row["draft_subsidy_fen"] - row["actual_subsidy_fen"]
        return dict(sorted(out.items()))

    def changed(self) -> list[Order]:
        """The orders in the period the draft would have refused or paid differently."""
        return [
            o
            for o in self.orders
            if o.in_period and (o.refused or (o.paid and o.draft_fen != o.actual_fen))
        ]

    def summary(self) -> dict[str, Any]:
        days = self.days().values()
        actual = sum(r["actual_subsidy_fen"] for r in days)
        drafted = sum(r["draft_subsidy_fen"] for r in days)
        return {
            "draft": self.draft,
            "timezone": self.timezone,
            "orders": sum(r["orders"] for r in days),
            "actual_subsidy_fen": actual,
            "draft_subsidy_fen": drafted,
            "difference_fen": drafted - actual,
            "refused_by_draft": sum(r["refused_by_draft"] for r in days),
            "orders_changed": len(self.changed()),
            "not_replayed": (
                "orders never reserved (refused at verification or by claim-time rules) and"
                " the draft's claim-time rules (window, region, quotas, per-person limits)"
            ),
        }


@dataclass
class _Replay:
    """One pool's draft budget while its stream is replayed."""

    pool: budget.Pool
    uses: dict[str, CategoryUse] = field(default_factory=dict)

    def use(self, category: str) -> CategoryUse:
        return self.uses.get(category) or CategoryUse(category)

    def step(self, event: Message, held: budget.Parts | None = None) -> None:
        self.pool, _ = budget.step(self.pool, event, held)
        category = getattr(event, "category", "")
        if isinstance(event, ev.SubsidyReserved | ev.SubsidyCaptured | ev.SubsidyReleased):
            self.uses[category] = evolve_use(self.use(category), event)


def _with(event: Message, subsidy_fen: int, parts: budget.Parts) -> Message:
    """A copy of ``event`` that moves ``subsidy_fen`` in ``parts`` (the draft's figures)."""
    copy = type(event)()
    copy.CopyFrom(event)
    copy.subsidy_fen = subsidy_fen  # type: ignore[attr-defined]
    del copy.sources[:]  # type: ignore[attr-defined]
    copy.sources.extend(parts_message(parts))  # type: ignore[attr-defined]
    return copy


def replay(
    fold: WhatIfFold,
    draft: Policy,
    start: dt.date | None = None,
    end: dt.date | None = None,
    pools: Collection[str] | None = None,
) -> WhatIf:
    """Every pool's history under ``draft`` for the orders reserved on days ``start``..``end``
    (inclusive, in the draft's time zone; None: unbounded). Orders outside the period keep
    the subsidy they had (the draft's rules are not applied to them), so the budget they use
    before and after the period is the real one, as far as the draft's budget still pays it.
    ``pools``: only these pools (None: every pool)."""
    zone = ZoneInfo(draft.claim_window.timezone)
    orders: list[Order] = []
    burn: dict[tuple[str, str], dict[str, int]] = {}
    for pool_id, events in sorted(fold.pools.items()):
        if pools is not None and pool_id not in pools:
            continue
        actual, draft_pool = budget.Pool(pool_id), _Replay(budget.Pool(pool_id))
        legacy: dict[str, budget.Parts] = {}  # parts of orders reserved before sources
        mine: dict[str, Order] = {}
        for at, event in events:
            order_id = str(getattr(event, "order_id", ""))
            actual, parts = budget.step(actual, event, legacy.get(order_id))
            if isinstance(event, ev.SubsidyReserved) and not event.sources:
                legacy[order_id] = parts
            day = at.astimezone(zone).date()
            if isinstance(event, ev.SubsidyReserved):
                order = _reserve(event, day, start, end, draft, draft_pool, fold.grades)
                mine[order_id] = order
                orders.append(order)
            elif isinstance(event, ev.SubsidyCaptured | ev.SubsidyReleased):
                order = mine[order_id]
                if isinstance(event, ev.SubsidyCaptured):
                    order.status = CAPTURED
                else:
                    order.status = REFUNDED if event.was_captured else RELEASED
                if not order.refused:
                    draft_pool.step(_with(event, order.draft_fen, order.draft_parts))
            else:
                draft_pool.step(event)
            burn[(pool_id, day.isoformat())] = {
                "actual_available_fen": actual.available,
                "actual_spent_fen": actual.spent,
                "draft_available_fen": draft_pool.pool.available,
                "draft_spent_fen": draft_pool.pool.spent,
            }
    return WhatIf(draft.version, draft.claim_window.timezone, orders, dict(sorted(burn.items())))


def _reserve(
    event: ev.SubsidyReserved,
    day: dt.date,
    start: dt.date | None,
    end: dt.date | None,
    draft: Policy,
    pool: _Replay,
    grades: dict[str, int | None],
) -> Order:
    """The order ``event`` reserved, decided again: inside the period at the draft's quote,
    outside it at the subsidy it had; either way against the draft's budget as replayed."""
    in_period = (start is None or day >= start) and (end is None or day <= end)
    order = Order(
        event.order_id,
        event.pool_id,
        event.category,
        event.sku,
        day.isoformat(),
        event.unit_price_fen,
        event.subsidy_fen,
        in_period,
    )
    fen = event.subsidy_fen
    rules = draft.funding
    if in_period:
        q = quote(draft, event.category, grades.get(event.sku), event.unit_price_fen)
        if not q.eligible:
            order.refused = q.reasons[0] if q.reasons else "NOT_ELIGIBLE"
            return order
        fen = q.subsidy_fen
    try:  # outside the period too: a generous draft may leave too little for later orders
        parts = check_funds(
            pool.pool, event.pool_id, event.category, fen, rules, pool.use(event.category)
        )
    except DomainError as exc:
        order.refused = exc.reason
        return order
    order.draft_fen, order.draft_parts = fen, parts
    pool.step(_with(event, fen, parts))
    return order
