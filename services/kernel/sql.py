"""Hot-path statements: written in SQLAlchemy Core, compiled once, run on psycopg prepared.

The checkout's profile (docs/benchmarks.md, issue 14) put a third of every service's CPU in
SQLAlchemy's per-execution work — building the statement's cache key, looking the compiled
form up, processing the result rows — about 100-200 µs a statement, against about 40 µs for
psycopg itself. A :class:`Statement` keeps SQLAlchemy as the way a statement is written (the
tables and columns of the service's schema, checked when the module is imported) and does that
work once, when it is built: it compiles the statement with the psycopg dialect, and each run
hands the SQL text and the parameters to the psycopg connection under SQLAlchemy's (the same
transaction), with ``prepare=True`` so PostgreSQL parses and plans it once per connection.

What it accepts is what psycopg adapts by itself: parameters and result columns whose SQLAlchemy
type has no bind or result processor (text, integers, booleans, bytea, timestamps, arrays of
those, JSONB read back). A statement that needs one, or an ``expanding`` IN list (write
``= ANY(:ids)`` with an array parameter instead), is refused when it is built, not when it runs.
A driver error is raised as SQLAlchemy would raise it (``IntegrityError``, ``OperationalError``,
...), so callers and ``faults.transient_part`` see the same exceptions either way.

Nothing maintained does this (SQLAlchemy's own caches are what costs; a query builder on
psycopg alone would give up the schema-checked Core); it is this module's few lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.errors import TransactionRollback
from psycopg.rows import namedtuple_row
from sqlalchemy import ARRAY, Boolean
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import TypeEngine

_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


class Statement:
    """One statement, compiled once; run it with :meth:`all`, :meth:`first`, :meth:`scalar`,
    :meth:`run` or :meth:`run_many` inside a transaction of a SQLAlchemy ``AsyncConnection``.

    Parameters are the statement's ``bindparam`` names; values written into the statement
    (``column == 5``) are bound as SQLAlchemy bound them. A missing parameter is a
    ``KeyError`` naming it, before anything is sent."""

    __slots__ = ("_defaults", "_required", "name", "sql")

    def __init__(self, statement: Executable, *, name: str = "") -> None:
        if not isinstance(statement, ClauseElement):
            raise TypeError(f"not a SQLAlchemy statement: {statement!r}")
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        self.name = name or str(compiled).split(None, 1)[0]
        # A column's Python-side default (``Column(default=...)``) is filled in by SQLAlchemy on
        # each execution; compiled once, it would be bound as None: refuse it, name the columns.
        prefetched = [*compiled.insert_prefetch, *compiled.update_prefetch]
        if prefetched:
            columns = ", ".join(c.key for c in prefetched)
            raise TypeError(f"{self.name}: Python-side default of {columns}; give the value(s)")
        for key, bind in compiled.binds.items():
            if bind.expanding:
                raise TypeError(f"{self.name}: {key} is an expanding IN; use = ANY(:{key})")
            if _processed(bind.type, bind=True):
                raise TypeError(f"{self.name}: {key}'s type {bind.type!r} needs a processor")
        returned = getattr(statement, "_returning", ()) or ()
        for column in [*getattr(statement, "selected_columns", ()), *returned]:
            if _processed(column.type, bind=False):
                label = getattr(column, "key", None) or str(column)
                raise TypeError(f"{self.name}: column {label}'s type needs a processor")
        self.sql = str(compiled)
        self._defaults = {
            k: v for k, v in compiled.params.items() if not compiled.binds[k].required
        }
        self._required = frozenset(k for k, b in compiled.binds.items() if b.required)

    def _params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        missing = self._required - given.keys()
        if missing:
            raise KeyError(f"{self.name}: missing parameter(s) {', '.join(sorted(missing))}")
        return {**self._defaults, **given} if self._defaults else dict(given)

    async def _execute(
        self, conn: AsyncConnection, params: Mapping[str, Any], *, named: bool = False
    ) -> psycopg.AsyncCursor[Any]:
        """Run the statement prepared on ``conn``'s driver connection; its cursor (rows as
        named tuples when ``named``). A driver error is raised as :func:`_failed` says."""
        raw = await driver(conn)
        try:
            cur = raw.cursor(row_factory=namedtuple_row) if named else raw.cursor()
            await cur.execute(self.sql, self._params(params), prepare=True)
        except psycopg.Error as exc:
            raise await _failed(conn, self.sql, params, exc) from exc
        return cur

    async def all(self, conn: AsyncConnection, **params: Any) -> list[Any]:
        """Every row, as named tuples (``row.column``)."""
        cur = await self._execute(conn, params, named=True)
        return await cur.fetchall()

    async def first(self, conn: AsyncConnection, **params: Any) -> Any | None:
        """The first row, or None."""
        cur = await self._execute(conn, params, named=True)
        return await cur.fetchone()

    async def scalar(self, conn: AsyncConnection, **params: Any) -> Any:
        """The first column of the first row, or None when there is no row."""
        row = await (await self._execute(conn, params)).fetchone()
        return None if row is None else row[0]

    async def run(self, conn: AsyncConnection, **params: Any) -> int:
        """Run a statement that returns no rows; the number of rows it touched."""
        return (await self._execute(conn, params)).rowcount

    async def run_many(self, conn: AsyncConnection, rows: Iterable[Mapping[str, Any]]) -> None:
        """Run the statement once per parameter set (psycopg's ``executemany``: one pipeline of
        round trips, not one wait per row). Nothing is sent for no rows."""
        batch: Sequence[dict[str, Any]] = [self._params(r) for r in rows]
        if not batch:
            return
        raw = await driver(conn)
        try:
            async with raw.cursor() as cur:
                await cur.executemany(self.sql, batch)
        except psycopg.Error as exc:
            raise await _failed(conn, self.sql, None, exc) from exc


async def _failed(
    conn: AsyncConnection, sql: str, params: Mapping[str, Any] | None, exc: psycopg.Error
) -> StatementError:
    """The error to raise for ``exc``, as SQLAlchemy wraps it, after
    :func:`invalidate_if_broken`."""
    await invalidate_if_broken(conn, exc)
    return DBAPIError.instance(sql, params, exc, psycopg.Error)


async def invalidate_if_broken(conn: AsyncConnection, exc: BaseException) -> None:
    """Invalidate ``conn`` if ``exc`` (a psycopg error, or SQLAlchemy's wrapping of one) says
    the connection under it broke, as SQLAlchemy does for a disconnect it sees itself: a
    statement run on psycopg directly fails where SQLAlchemy cannot see it, and the pool would
    otherwise try to reset the connection on its way back (and log an error while the database
    is down) and hand it out again. A serialisation failure or deadlock breaks nothing."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    broken = isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)
    if broken and not isinstance(orig, TransactionRollback) and not conn.invalidated:
        await conn.invalidate()


def _processed(type_: TypeEngine[Any], *, bind: bool) -> bool:
    """Whether SQLAlchemy would convert a value of ``type_`` on its way in (``bind``) or out,
    which psycopg alone would not: such a statement cannot be run here. A boolean's bind
    processor only coerces to ``bool`` and an array's applies its items' (psycopg adapts
    lists), so those count by what they hold."""
    impl = type_.dialect_impl(_DIALECT)
    if isinstance(impl, ARRAY):
        return _processed(impl.item_type, bind=bind)
    if bind and isinstance(impl, Boolean):
        return False
    try:
        if bind:
            return impl.bind_processor(_DIALECT) is not None
        return impl.result_processor(_DIALECT, None) is not None
    except TypeError:  # a processor chosen by the column's database type (numeric): refuse
        return True


async def driver(conn: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under SQLAlchemy's, in the same transaction.

    Read through the started connection's attributes when it has begun (awaiting
    ``get_raw_connection`` costs about 30 µs of the loop's time a statement, as much as the
    statement's own client work), through ``get_raw_connection`` otherwise."""
    sync = conn.sync_connection
    raw = (
        sync.connection.driver_connection
        if sync is not None and not sync.closed
        else (await conn.get_raw_connection()).driver_connection
    )
    if not isinstance(raw, psycopg.AsyncConnection):
        raise TypeError(f"not a psycopg connection: {type(raw).__name__}")
    return raw
