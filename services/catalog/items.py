"""VerifyItem's reads: one prepared statement for every call in flight, and a price-history cache
that is never stale.

The checkout asks the catalog about one item per reservation, many at once. Each call needs the
product and its merchant as they are now, the order holding the unit's serial (written by the
consumer of the ledger's events, on any replica), and the product's price history in the
baseline window. The first three are index lookups read on every call; the price history is
what costs (two aggregates over the history and an array of timestamps to parse), and it
changes only when the product's stream does: every price change and registration is appended
to ``product/<sku>`` and projected in the same transaction, so the stream's version read in the
same statement as the rest says whether a cached history is still the product's. A changed
(or unknown) version brings the history in that same statement.

Calls that arrive while a read is in flight wait for the next one, which reads for all of them
together (``= ANY``-style over arrays, one round trip and one pooled connection for the batch).
A waiting call's read starts after the call arrived, so it sees every change committed before
it, on this replica or any other, as a read of its own would.

Each read also returns the switch stream's version and the number of approved policies, so the
handler reloads them before answering when another replica changed them (the background
refresh only keeps idle replicas current for Quote and GetSwitches).

Most calls need no row read at all. Every transaction that writes a product, a merchant or a
price gives the catalog clock a new random mark at its commit (``catalog_clock``,
projections.py), and every read returns the mark with its rows; the product and merchant
fields of each row read are kept with that mark. A batch whose calls all have such rows (and no
serial to look up: the orders holding serials change with every checkout) reads only the mark,
the switch version and the policy count, in one statement without parameters; while the mark
reads what it read with a call's rows, no change to them can have committed in between, and
the call is answered from memory, exactly as a read of its own would have answered. A call
whose rows are older than the mark is read again, in a statement with the rest of its batch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.kernel.batching import arrivals
from services.kernel.sql import Statement

MAX_BATCH: Final = 256  # calls read by one statement at most
# Every statement is sent at least this many rows of parameters (padded with empty SKUs, which
# no product has and the statement skips). Why: PostgreSQL plans a prepared statement again on
# every run until its generic plan (costed for 10 rows of unnest) looks no dearer than the
# plans made for the actual parameters, and batches of a few calls never did: planning was
# most of the statement's cost. Padded, the generic plan wins after five runs and is kept.
MIN_ROWS: Final = 16
MAX_CACHED: Final = 50_000  # products whose price history is kept (a few hundred bytes each)
UNKNOWN: Final = -1  # "no cached version": the statement sends the history

# What every read returns besides its rows: the switch stream's version, how many policies are
# approved, and the catalog clock's mark.
_VERSIONS: Final = """coalesce((SELECT version FROM streams WHERE stream_id = :switches), 0)
                   AS switches_v,
               (SELECT count(*) FROM policies) AS policies,
               (SELECT mark::text FROM catalog_clock WHERE id = 1) AS clock"""

# One row per call, in the calls' order. ``product_v`` is 0 for a SKU with no stream.
_ITEMS = Statement(
    text(
        f"""
        SELECT k.i, coalesce(ps.version, 0) AS product_v,
               p.sku, p.category, p.grade, p.merchant_id, p.status AS product_status,
               coalesce(m.status, '') AS merchant_status, h.prices, h.times,
               s.order_id AS serial_order, s.status AS serial_status,
               {_VERSIONS}
        FROM unnest(CAST(:skus AS text[]), CAST(:serials AS text[]), CAST(:known AS bigint[]))
             WITH ORDINALITY AS k(sku, serial, known, i)
        LEFT JOIN products p ON p.sku = k.sku
        LEFT JOIN merchants m ON m.merchant_id = p.merchant_id
        LEFT JOIN streams ps ON ps.stream_id = :stream_prefix || k.sku
        LEFT JOIN LATERAL (
            SELECT array_agg(ph.price_fen ORDER BY ph.effective_at, ph.event_id) AS prices,
                   array_agg(ph.effective_at ORDER BY ph.effective_at, ph.event_id) AS times
            FROM price_history ph
            WHERE coalesce(ps.version, 0) <> k.known AND ph.sku = k.sku
              AND ph.effective_at >= coalesce(
                (SELECT max(effective_at) FROM price_history
                 WHERE sku = k.sku AND effective_at <= :start),
                '-infinity'::timestamptz)
        ) h ON true
        LEFT JOIN LATERAL (
            SELECT o.order_id, o.status FROM sales_orders o
            WHERE o.serial = k.serial AND o.serial <> '' AND o.status IN ('RESERVED', 'CAPTURED')
            ORDER BY (o.status = 'CAPTURED') DESC, o.reserved_at
            LIMIT 1
        ) s ON true
        WHERE k.sku <> ''
        ORDER BY k.i
        """
    ),
    name="verify items",
)

# What a batch of calls answered from memory reads: has anything they cached changed?
_CLOCK = Statement(
    text(
        f"""
        SELECT {_VERSIONS}
        """
    ),
    name="catalog clock",
)

History = tuple[tuple[dt.datetime, int], ...]


@dataclass(frozen=True, slots=True)
class ItemRow:
    """What VerifyItem reads for one call: the product and its merchant as they are (``sku``
    None: no such product), the order holding the call's serial, and the switch and policy
    versions the read saw."""

    product_v: int
    sku: str | None
    category: str  # this and the three below are empty when there is no such product
    grade: int
    merchant_id: str
    product_status: str
    merchant_status: str
    serial_order: str | None
    serial_status: str | None
    switches_v: int
    policies: int


@dataclass(frozen=True, slots=True)
class CachedItem:
    """A product's row as read while the catalog clock read ``clock`` (its serial fields
    empty: those are read on every call that has a serial)."""

    clock: str  # the clock's mark
    row: ItemRow


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine's pool, its connections in autocommit: a single SELECT needs no BEGIN and
    ROLLBACK round trips. (A connection that breaks under a Statement invalidates itself:
    services.kernel.sql.)"""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@dataclass(frozen=True, slots=True)
class CachedHistory:
    """A product's price history at one version of its stream, read for a window start: every
    price from the last one set at or before ``start`` on (so it holds what any later start
    needs)."""

    version: int
    start: dt.datetime
    history: History


def in_window(history: History, start: dt.datetime) -> History:
    """The prices the baseline over a window opening at ``start`` uses: the last one set at or
    before ``start`` (with any set at the same instant) and every later one. ``history`` must
    hold every price from some start at or before ``start`` (a :class:`CachedHistory`'s)."""
    cutoff = None
    for at, _ in history:
        if at <= start:
            cutoff = at
        else:
            break
    if cutoff is None:
        return history
    return tuple(p for p in history if p[0] >= cutoff)


# A call's answer: its row, the window start its history was read for (None: the row came
# from memory, the history is the cached one) and that history (as read: empty if unchanged).
_Answer = tuple[ItemRow, dt.datetime | None, History]


@dataclass(slots=True)
class _Call:
    sku: str
    serial: str
    known: int
    start: dt.datetime
    item: CachedItem | None  # rows to answer from, if the clock has not moved since
    answer: asyncio.Future[_Answer]


def _keep(cache: dict[str, Any], key: str, value: Any) -> None:
    """Put ``value`` in a bounded cache: the oldest entry makes room."""
    if key not in cache and len(cache) >= MAX_CACHED:
        cache.pop(next(iter(cache)))
    cache[key] = value


class ItemReads:
    """Reads for VerifyItem, coalesced: :meth:`read` returns one call's row; calls that overlap
    share one statement. The price histories it read are kept in :attr:`histories`, the rows in
    :attr:`rows` with the clock they were read at (both bounded; the oldest entry goes
    first)."""

    def __init__(self, engine: AsyncEngine, product_stream: str, switches_stream: str) -> None:
        self._engine = autocommit_engine(engine)
        self._prefix = product_stream  # a product's stream is this and its SKU
        self._switches = switches_stream
        self._waiting: list[_Call] = []
        self._reader: asyncio.Task[None] | None = None
        self.histories: dict[str, CachedHistory] = {}
        self.rows: dict[str, CachedItem] = {}
        self.statements = 0  # statements run (tests and benchmarks read it)
        self.from_memory = 0  # calls answered from the rows kept (tests and benchmarks)

    async def read(
        self, sku: str, serial: str, start: dt.datetime
    ) -> tuple[ItemRow, CachedHistory | None]:
        """The row for ``sku`` (with the order holding ``serial``), and the product's price
        history at the version the row was read at, for a window opening at ``start`` or later
        (None: no such product). The history comes from the cache when it is for that version
        and a start at or before ``start``; otherwise the same statement reads it. With no
        serial, and the product's row and history kept, only the clock is read (if nothing
        else in the batch needs a statement): the row comes from memory while it has not
        moved."""
        cached = self.histories.get(sku)
        known = cached.version if cached is not None and cached.start <= start else UNKNOWN
        item = self.rows.get(sku) if not serial and known != UNKNOWN else None
        if item is not None and item.row.product_v != known:
            item = None
        answer: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(sku, serial, known, start, item, answer))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_waiting())
        row, read_from, history = await answer
        if row.sku is None:
            return row, None
        if cached is not None and (read_from is None or row.product_v == known):
            return row, cached
        assert read_from is not None  # from memory only with a cached history
        # Read for the batch's earliest start: a superset of what this call's start needs.
        entry = CachedHistory(row.product_v, read_from, history)
        self.keep(sku, entry)
        return row, entry

    def keep(self, sku: str, entry: CachedHistory) -> None:
        """Cache a history read (bounded: the oldest entry makes room)."""
        _keep(self.histories, sku, entry)

    async def _read_waiting(self) -> None:
        calls: list[_Call] = []
        try:
            await arrivals(self._waiting)
            while self._waiting:
                try:
                    # One connection for as long as calls keep coming: the pool's checkout and
                    # return, and the autocommit switch, once per busy spell (which goes on
                    # while calls come within a few turns of the loop).
                    async with self._engine.connect() as conn:
                        while self._waiting:
                            calls = self._waiting[:MAX_BATCH]
                            del self._waiting[:MAX_BATCH]
                            await self._answer(conn, calls)
                            calls = []
                            await arrivals(self._waiting)
                except Exception as exc:  # the connection is returned (or discarded) first
                    for call in calls:
                        if not call.answer.done():
                            call.answer.set_exception(exc)
                    calls = []
        finally:
            self._reader = None
            # Only if this task was cancelled (shutdown): no caller may wait for ever.
            for call in [*calls, *self._waiting]:
                if not call.answer.done():
                    call.answer.cancel()
            self._waiting.clear()

    async def _answer(self, conn: AsyncConnection, calls: Sequence[_Call]) -> None:
        """Answer a batch: the calls with rows kept from memory if the clock has not moved
        since they were read, every other call (and those, if it has) from a read of its rows.
        One statement when nothing moved."""
        remembered = [c for c in calls if c.item is not None]
        rest = [c for c in calls if c.item is None]
        if rest:
            now = await self._read_rows(conn, rest)
        else:
            self.statements += 1
            now = await _CLOCK.first(conn, switches=self._switches)
        stale: list[_Call] = []
        for call in remembered:
            assert call.item is not None
            # A clock that reads nothing (no row: a database the revision has not reached)
            # proves nothing: read.
            if now.clock is None or call.item.clock != now.clock:
                stale.append(call)
            elif not call.answer.done():  # a caller past its deadline left
                row = replace(call.item.row, switches_v=now.switches_v, policies=now.policies)
                call.answer.set_result((row, None, ()))
                self.from_memory += 1
        if stale:
            await self._read_rows(conn, stale)

    async def _read_rows(self, conn: AsyncConnection, calls: Sequence[_Call]) -> Any:
        """Read the calls' rows and answer them; keep each product's row with the clock; the
        last row (its clock and versions are every row's: one statement, one snapshot)."""
        start = min(c.start for c in calls)
        rows = await self._run(conn, calls, start)
        for call, r in zip(calls, rows, strict=True):
            row = ItemRow(
                product_v=r.product_v,
                sku=r.sku,
                category=r.category or "",
                grade=r.grade or 0,
                merchant_id=r.merchant_id or "",
                product_status=r.product_status or "",
                merchant_status=r.merchant_status,
                serial_order=r.serial_order,
                serial_status=r.serial_status,
                switches_v=r.switches_v,
                policies=r.policies,
            )
            if r.sku is not None and r.clock is not None:
                kept = replace(row, serial_order=None, serial_status=None)
                _keep(self.rows, r.sku, CachedItem(r.clock, kept))
            if not call.answer.done():  # a caller past its deadline left
                history = tuple(zip(r.times or (), r.prices or (), strict=True))
                call.answer.set_result((row, start, history))
        return rows[-1]

    async def _run(self, conn: AsyncConnection, calls: Sequence[_Call], start: dt.datetime) -> Any:
        self.statements += 1
        pad = [""] * max(0, MIN_ROWS - len(calls))
        return await _ITEMS.all(
            conn,
            skus=[c.sku for c in calls] + pad,
            serials=[c.serial for c in calls] + pad,
            known=[c.known for c in calls] + [0] * len(pad),
            start=start,  # the earliest: every call's window opens at or after it
            stream_prefix=self._prefix,
            switches=self._switches,
        )
