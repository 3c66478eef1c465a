"""The bureau's daily report (定期回传): one campaign day's subsidies, refunds and clawbacks per
category and funding source, and the money left at the day's end, as CSV and XLSX whose bytes
are a function of the events alone.

Built from the fund-detail ledger (:mod:`services.kernel.contract.fundledger`), so the live
report (the ledger's, from its own store) and the one an auditor rebuilds from the audit log
go through the same code and must come out byte-identical. The day is the campaign's: midnight
to midnight in the time zone of the policy in force (``claim_window.timezone``, the zone the
claim window and the daily quotas are counted in).

The rows, in one table with a fixed column order (:data:`HEADERS`), in this order:

- ``CATEGORY``, one per category that had a capture, refund or clawback that day (by category):
  ``orders`` (captures), ``subsidy_fen`` (captured), ``refunds`` and ``refunded_fen`` (refunds
  after capture, credited back to the sources that paid), ``clawbacks`` and ``clawback_fen``
  (owed back by merchants already settled for a refunded order);
- ``TOTAL``: the day's sums of those figures (the categories add up to it);
- ``SOURCE``, per pool, source and category: each source's share of the same figures (the
  sources of a category add up to its ``CATEGORY`` row);
- ``POOL_REMAINING`` per pool and ``SOURCE_REMAINING`` per pool and source: funded, scheduled,
  available, reserved and spent at the end of the day (a pool's stream up to its first event
  at or after midnight; the sources add up to the pool).

No wall-clock time goes into either file: the XLSX's creation date is the day's start.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from zoneinfo import ZoneInfo

from services.kernel.contract import fundledger
from services.kernel.contract.fundledger import CAPTURED, CLAWBACK, REFUNDED, Movement
from services.kernel.contract.policy_model import in_force
from services.kernel.contract.policy_proto import policy_of
from services.kernel.contract.spreadsheet import csv_bytes, xlsx_bytes
from subsidy.v1 import events_pb2 as ev

CATEGORY, TOTAL, SOURCE = "CATEGORY", "TOTAL", "SOURCE"
POOL_REMAINING, SOURCE_REMAINING = "POOL_REMAINING", "SOURCE_REMAINING"
FLOWS: Final = ("orders", "subsidy_fen", "refunds", "refunded_fen", "clawbacks", "clawback_fen")
BALANCES: Final = ("funded_fen", "scheduled_fen", "available_fen", "reserved_fen", "spent_fen")
HEADERS: Final = ("date", "section", "pool_id", "source", "category", *FLOWS, *BALANCES)
SHEET: Final = "daily report"
_PUBLISHED: Final = ev.PolicyPublished.DESCRIPTOR.full_name


@dataclass(frozen=True)
class Day:
    """A campaign day: its date and the instants (UTC) it starts and ends at."""

    date: dt.date
    timezone: str

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.date, dt.time(), ZoneInfo(self.timezone)).astimezone(dt.UTC)

    @property
    def end(self) -> dt.datetime:
        tomorrow = self.date + dt.timedelta(days=1)
        return dt.datetime.combine(tomorrow, dt.time(), ZoneInfo(self.timezone)).astimezone(dt.UTC)

    def holds(self, at: dt.datetime) -> bool:
        """Whether the instant ``at`` is in this day."""
        return self.start <= at < self.end


@dataclass(frozen=True)
class Line:
    """One row of the report (figures not used by its section are 0)."""

    section: str
    pool_id: str = ""
    source: str = ""
    category: str = ""
    orders: int = 0
    subsidy_fen: int = 0
    refunds: int = 0
    refunded_fen: int = 0
    clawbacks: int = 0
    clawback_fen: int = 0
    funded_fen: int = 0
    scheduled_fen: int = 0
    available_fen: int = 0
    reserved_fen: int = 0
    spent_fen: int = 0

    def figures(self) -> tuple[int, ...]:
        """The line's figures in :data:`HEADERS` order."""
        return tuple(getattr(self, f) for f in (*FLOWS, *BALANCES))

    def having(self, figures: dict[str, int]) -> Line:
        """This line with ``figures`` (by name) set."""
        named: dict[str, Any] = dict(figures)  # every name is an int field's
        return replace(self, **named)


@dataclass(frozen=True)
class DailyReport:
    """A day's report: its lines in order, and the files."""

    day: Day
    lines: tuple[Line, ...]

    def rows(self) -> list[tuple[object, ...]]:
        """The lines as spreadsheet rows, in :data:`HEADERS` order."""
        date = self.day.date.isoformat()
        return [
            (date, x.section, x.pool_id, x.source, x.category, *x.figures()) for x in self.lines
        ]

    def csv(self) -> bytes:
        """The report as CSV (formula-safe, UTF-8 with BOM, CRLF)."""
        return csv_bytes(HEADERS, self.rows())

    def xlsx(self) -> bytes:
        """The report as XLSX, the same rows on one sheet, its dates pinned to the day's start
        so the bytes depend on the rows alone."""
        return xlsx_bytes([(SHEET, HEADERS, self.rows())], created=self.day.start)

    def total(self) -> Line:
        """The day's ``TOTAL`` line."""
        return next(x for x in self.lines if x.section == TOTAL)


def _at(movement: Movement) -> dt.datetime:
    return dt.datetime.fromisoformat(movement.occurred_at)


class _Flows:
    """Captures, refunds and clawbacks, each counted once per event and summed in fen."""

    def __init__(self) -> None:
        self.events: dict[str, set[str]] = defaultdict(set)
        self.fen: dict[str, int] = defaultdict(int)

    def add(self, m: Movement) -> None:
        self.events[m.kind].add(m.event_id)
        self.fen[m.kind] += m.amount_fen

    def figures(self) -> dict[str, int]:
        return {
            "orders": len(self.events[CAPTURED]),
            "subsidy_fen": self.fen[CAPTURED],
            "refunds": len(self.events[REFUNDED]),
            "refunded_fen": self.fen[REFUNDED],
            "clawbacks": len(self.events[CLAWBACK]),
            "clawback_fen": self.fen[CLAWBACK],
        }


def _remaining(movements: Sequence[Movement], day: Day) -> list[Line]:
    """Each pool's and source's balances at the end of ``day``: a pool's stream up to its
    first event at or after the day's end (a true state of the pool, whatever the clocks of
    later events say); a source's balances are those after its last movement in it."""
    cutoff: dict[str, int] = {}
    for m in movements:
        if m.kind != CLAWBACK and m.pool_id not in cutoff and _at(m) >= day.end:
            cutoff[m.pool_id] = m.stream_version
    last: dict[tuple[str, str], Movement] = {}
    for m in movements:
        if not m.pool_id or m.stream_version >= cutoff.get(m.pool_id, m.stream_version + 1):
            continue
        last[(m.pool_id, m.source)] = m
    sources = [
        Line(SOURCE_REMAINING, pool_id, source).having({b: getattr(m, b) for b in BALANCES})
        for (pool_id, source), m in sorted(last.items())
    ]
    pools: dict[str, dict[str, int]] = {}
    for x in sources:
        sums = pools.setdefault(x.pool_id, dict.fromkeys(BALANCES, 0))
        for b in BALANCES:
            sums[b] += getattr(x, b)
    totals = [Line(POOL_REMAINING, p).having(sums) for p, sums in sorted(pools.items())]
    return totals + sources


def daily_report(movements: Iterable[Movement], day: Day) -> DailyReport:
    """The report of ``day`` from the fund-detail ledger's rows (all of them: the balances at
    the day's end need every earlier movement)."""
    rows = list(movements)
    by_category: dict[str, _Flows] = defaultdict(_Flows)
    by_source: dict[tuple[str, str, str], _Flows] = defaultdict(_Flows)
    total = _Flows()
    for m in rows:
        if m.kind not in (CAPTURED, REFUNDED, CLAWBACK) or not day.holds(_at(m)):
            continue
        by_category[m.category].add(m)
        by_source[(m.pool_id, m.source, m.category)].add(m)
        total.add(m)
    lines = [Line(CATEGORY, category=c).having(f.figures()) for c, f in sorted(by_category.items())]
    lines.append(Line(TOTAL).having(total.figures()))
    lines += [
        Line(SOURCE, p, s, c).having(f.figures()) for (p, s, c), f in sorted(by_source.items())
    ]
    lines += _remaining(rows, day)
    return DailyReport(day, tuple(lines))


def from_events(envelopes: Iterable[ev.EventEnvelope], day: Day) -> DailyReport:
    """The report of ``day`` from the ledger's events (others are ignored)."""
    return daily_report(fundledger.movements(envelopes), day)


def campaign_timezone(envelopes: Iterable[ev.EventEnvelope], at: dt.datetime) -> str:
    """The campaign's time zone as the catalog's published policies say it: the claim
    window's zone of the version in force at ``at`` (what the ledger asks catalog for)."""
    versions = [
        policy_of(ev.PolicyPublished.FromString(env.payload))
        for env in envelopes
        if env.service == "catalog" and env.event_type == _PUBLISHED
    ]
    return in_force(versions, at).claim_window.timezone
