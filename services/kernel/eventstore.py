"""The event store: an append-only log of envelopes per service, on PostgreSQL via SQLAlchemy.

(About 500 lines, on purpose: the events table, its guarantees and the privileges that keep it
append-only belong together; the command pipeline and the relay are elsewhere.)

Three guarantees, each tested in tests/kernel/test_eventstore.py:

- ``append`` is atomic and checks the expected version; a conflict raises
  :class:`WrongExpectedVersion` and writes nothing.
- ``read_all`` returns events in one global order that a poller can never overtake. Each row
  records the id of the transaction that wrote it (``xid8``); a reader orders by
  ``(tx_id, position)`` and only reads rows whose transaction is older than the oldest one still
  running in this database (:data:`READ_HORIZON`). A transaction that commits late therefore
  holds readers back instead of being skipped, and writers never serialise on a table lock.
- The events table is the outbox: the relay reads it with ``read_all`` and checkpoints.

Every append is one prepared statement run on psycopg directly (:data:`_APPEND`); the
standalone :meth:`EventStore.append` group-commits concurrent appends to different streams into
one such statement, one transaction and one WAL flush, each still all or nothing on its own.

Services keep their decision state in ordinary tables updated in the same transaction as the
append (inline projections); replaying the stream rebuilds them exactly.

The log is append-only in the database too, not only in this code: a service's schema is
migrated (services/kernel/schema.py, Alembic) as a migration role that owns the tables and grants
the service's runtime role, table by table, the privileges in the table's ``info["grants"]``
(:data:`APPEND_ONLY` for the events table: SELECT and INSERT, never UPDATE, DELETE or TRUNCATE)
or :data:`READ_WRITE` for read models and bookkeeping (:func:`grant_statements`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from google.protobuf.message import Message
from psycopg import pq
from psycopg._preparing import Prepare, PrepareManager
from psycopg.errors import TransactionRollback
from psycopg.pq.abc import PGresult
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import UserDefinedType

from .batching import GroupCommit
from .errors import WrongExpectedVersion as WrongExpectedVersion  # raised here; see errors
from .events import Context, Envelope, check_actor, check_size, new_envelope
from .sql import Statement, driver, invalidate_if_broken

log = logging.getLogger(__name__)

Projector = Callable[[AsyncConnection, Envelope], Awaitable[None]]


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


# What a service's runtime role may do to a table, kept with the table (Table.info["grants"]);
# a table that says nothing is a read model or bookkeeping, rebuilt or rewritten by design.
GRANTS = "grants"
APPEND_ONLY: tuple[str, ...] = ("SELECT", "INSERT")
READ_WRITE: tuple[str, ...] = ("SELECT", "INSERT", "UPDATE", "DELETE")

kernel_metadata = MetaData()

events_table = Table(
    "events",
    kernel_metadata,
    Column("position", BigInteger, Identity(always=True), nullable=False),
    Column("tx_id", Xid8(), nullable=False, server_default=text("pg_current_xact_id()")),
    Column("event_id", String(36), primary_key=True),
    Column("stream_id", String(200), nullable=False),
    Column("stream_version", BigInteger, nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    Column("recorded_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    UniqueConstraint("stream_id", "stream_version", name="events_stream_version"),
    Index("events_global_order", "tx_id", "position"),
    # The log: a runtime role appends and reads, and can never rewrite or erase history.
    info={GRANTS: APPEND_ONLY},
)

streams_table = Table(
    "streams",
    kernel_metadata,
    Column("stream_id", String(200), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

checkpoints_table = Table(
    "checkpoints",
    kernel_metadata,
    Column("name", String(200), primary_key=True),
    Column("tx_id", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
)

handled_table = Table(
    "handled_events",
    kernel_metadata,
    Column("consumer", String(100), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("handled_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    PrimaryKeyConstraint("consumer", "event_id"),
)


def grant_statements(
    metadatas: Sequence[MetaData], role: str, dialect: Dialect
) -> list[TextClause]:
    """The statements that give ``role`` exactly the privileges each table declares, and no
    more: everything it held before on those tables is revoked first (in the same
    transaction), so a table made stricter in a later release is stricter after the next
    migration too. Sequences are not granted: identity columns need none for INSERT."""
    quote = dialect.identifier_preparer.quote
    grantee = quote(role)
    statements = [text(f"GRANT USAGE ON SCHEMA public TO {grantee}")]
    for md in metadatas:
        for table in md.sorted_tables:
            privileges = table.info.get(GRANTS, READ_WRITE)
            unknown = set(privileges) - set(READ_WRITE)
            if unknown:  # TRUNCATE, REFERENCES, TRIGGER: never a runtime role's
                raise ValueError(f"table {table.name}: privileges {sorted(unknown)} not allowed")
            name = quote(table.name)
            statements.append(text(f"REVOKE ALL ON TABLE {name} FROM {grantee}"))
            statements.append(text(f"GRANT {', '.join(privileges)} ON TABLE {name} TO {grantee}"))
    return statements


class Position(NamedTuple):
    """A place in the global order: (writer transaction id, row position)."""

    tx_id: int
    position: int

    def __str__(self) -> str:
        return f"{self.tx_id}:{self.position}"


START = Position(0, 0)


@dataclass(frozen=True)
class Recorded:
    """An event as read back from the store, with its place in the global order."""

    position: Position
    envelope: Envelope


class _PreparedKeptOnRollback(PrepareManager):
    """psycopg's record of a connection's prepared statements, kept through a ROLLBACK.

    psycopg forgets every statement it prepared on a connection at each rollback and sends
    DEALLOCATE ALL (in case the rollback undid DDL a statement depended on), so each one is
    parsed and planned again at its next run. SQLAlchemy ends every read-only use of a pooled
    connection with a rollback: the checkout's statement log showed about one DEALLOCATE ALL
    per ledger RPC, and the hot path's prepared statements (the append, the stream lock, the
    relay's read) re-prepared as often. A prepared statement is PostgreSQL session state, not
    transactional: a rollback leaves it as it was, and the runtime roles cannot run DDL at
    all. So a rollback keeps them; a DROP, ALTER, DISCARD ALL or DEALLOCATE ALL run on the
    connection still makes psycopg forget them, as before."""

    _clears = re.compile(rb"^(?:DROP|ALTER|DISCARD ALL|DEALLOCATE ALL)\b").match

    def _should_discard(self, prep: Prepare, results: Sequence[PGresult]) -> bool:  # type: ignore[override]
        if self._names or prep == Prepare.SHOULD:
            for result in results:
                status = result.command_status
                if result.status == pq.ExecStatus.COMMAND_OK and status and self._clears(status):
                    return PrepareManager.clear(self)
        return False

    def clear(self) -> bool:
        return False  # called by psycopg's rollback only (see the class)


def _keep_prepared_on_rollback(dbapi_connection: Any, _record: Any) -> None:
    """On each new pooled connection: its prepared statements outlive a rollback (a no-op with
    a psycopg whose internals differ from those this was written for: only the saving is lost)."""
    prepared = getattr(getattr(dbapi_connection, "driver_connection", None), "_prepared", None)
    if type(prepared) is PrepareManager:
        prepared.__class__ = _PreparedKeptOnRollback


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine of at most ``2 * pool_size`` connections, each kept once opened.

    It used to keep ``pool_size`` and open as many again as overflow, each closed as it came
    back while ``pool_size`` others waited idle: under the checkout bench (16 calls in flight,
    each reservation holding a connection while it queues on its pool's lock) the ledger
    opened 58 connections in 300 checkouts. Opening one costs about 3.2 ms of client CPU
    (measured alone: SCRAM authentication and set-up), and on each new connection every hot
    statement is prepared again and the server starts a backend (docs/perf/session23-ledger/
    README.md). The most connections open at once is the same as before; what changes is that
    one opened for a peak stays in the pool, until the hourly recycle, instead of being closed
    and opened again at the next peak."""
    # No pre-ping: it costs a round trip on every checkout of the hot path. A connection that
    # broke is invalidated by SQLAlchemy when it fails, and recycled hourly anyway.
    engine = create_async_engine(url, pool_size=2 * pool_size, max_overflow=0, pool_recycle=3600)
    event.listen(engine.sync_engine, "connect", _keep_prepared_on_rollback)
    return engine


def _event_rows(
    stream_id: str, expected_version: int, envelopes: Sequence[Envelope]
) -> list[dict[str, Any]]:
    """The events table's rows for ``envelopes`` appended after ``expected_version``; stamps
    each envelope with its stream and version on the way."""
    rows = []
    for i, env in enumerate(envelopes, start=1):
        env.stream_id = stream_id
        env.stream_version = expected_version + i
        check_size(env)
        check_actor(env)
        rows.append(
            {
                "event_id": env.event_id,
                "stream_id": stream_id,
                "stream_version": env.stream_version,
                "event_type": env.event_type,
                "envelope": env.SerializeToString(deterministic=True),
            }
        )
    return rows


# Every append is this one statement, for one stream or many (a group commit's batch): move each
# stream's version from the expected one to the new one, and insert the events of the streams
# that moved, and only theirs. A stream at its expected version 0 is created (or its version-0
# placeholder row, lock_stream's, taken); a later version must be the row's. It returns the
# streams that moved: a stream missing from the answer was not at its expected version and got
# nothing, while the others in the same statement did. The streams are distinct (the batcher
# and Tx.append see to that), so no row is touched twice. One statement instead of two saves a
# round trip and a statement's client work per append; it is prepared on the connection
# (psycopg, prepare=True) because SQLAlchemy's statement building showed in the profile.
_APPEND = """
WITH m AS (
  SELECT * FROM unnest(%(streams)s::text[], %(expected)s::bigint[], %(new)s::bigint[])
    AS m(stream_id, expected, new)
), created AS (
  INSERT INTO streams (stream_id, version)
  SELECT stream_id, new FROM m WHERE expected = 0 ORDER BY stream_id
  ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version WHERE streams.version = 0
  RETURNING stream_id
), moved AS (
  UPDATE streams SET version = m.new FROM m
  WHERE m.expected > 0 AND streams.stream_id = m.stream_id AND streams.version = m.expected
  RETURNING streams.stream_id
), done AS (
  SELECT stream_id FROM created UNION ALL SELECT stream_id FROM moved
), written AS (
  INSERT INTO events (event_id, stream_id, stream_version, event_type, envelope)
  SELECT e.event_id, e.stream_id, e.stream_version, e.event_type, e.envelope
  FROM unnest(%(ids)s::text[], %(event_streams)s::text[], %(versions)s::bigint[],
              %(types)s::text[], %(envelopes)s::bytea[])
    WITH ORDINALITY AS e(event_id, stream_id, stream_version, event_type, envelope, n)
  JOIN done USING (stream_id)
  ORDER BY e.n
  RETURNING 1
)
SELECT stream_id FROM done
"""
_VERSIONS = "SELECT stream_id, version FROM streams WHERE stream_id = ANY(%(streams)s::text[])"


@dataclass(frozen=True)
class _Append:
    """One caller's append, its rows built (and each envelope's size checked) by the caller."""

    stream_id: str
    expected: int
    rows: list[dict[str, Any]]

    @property
    def new_version(self) -> int:
        return self.expected + len(self.rows)


def _append_params(appends: Sequence[_Append]) -> dict[str, list[Any]]:
    rows = [r for a in appends for r in a.rows]
    return {
        "streams": [a.stream_id for a in appends],
        "expected": [a.expected for a in appends],
        "new": [a.new_version for a in appends],
        "ids": [r["event_id"] for r in rows],
        "event_streams": [r["stream_id"] for r in rows],
        "versions": [r["stream_version"] for r in rows],
        "types": [r["event_type"] for r in rows],
        "envelopes": [r["envelope"] for r in rows],
    }


async def _append_rows(
    raw: psycopg.AsyncConnection[Any], appends: Sequence[_Append]
) -> list[int | WrongExpectedVersion]:
    """Run :data:`_APPEND` for ``appends`` on ``raw``; each one's new version, or the
    :class:`WrongExpectedVersion` it met (and then nothing of it was written).

    A driver error is raised as SQLAlchemy would have wrapped it (``IntegrityError``,
    ``OperationalError``, ...), so callers and faults.transient_part see what they saw when
    the append went through SQLAlchemy."""
    try:
        cur = await raw.execute(_APPEND, _append_params(appends), prepare=True)
        moved = {r[0] for r in await cur.fetchall()}
        missed = [a.stream_id for a in appends if a.stream_id not in moved]
        actual: dict[str, int] = {}
        if missed:
            cur = await raw.execute(_VERSIONS, {"streams": missed})
            actual = {r[0]: int(r[1]) for r in await cur.fetchall()}
    except psycopg.Error as exc:
        raise DBAPIError.instance(_APPEND, None, exc, psycopg.Error) from exc
    return [
        a.new_version
        if a.stream_id in moved
        else WrongExpectedVersion(a.stream_id, a.expected, actual.get(a.stream_id, 0))
        for a in appends
    ]


# The hot path's other statements, run on psycopg directly and prepared, as _APPEND is: through
# SQLAlchemy each cost about 320 us of client CPU, directly about 120 (one connection, a loop of
# the lock statement, same run).
_LOCK = "SELECT version FROM streams WHERE stream_id = %(s)s FOR UPDATE"
_CREATE = (
    "INSERT INTO streams (stream_id, version) VALUES (%(s)s, 0) "
    "ON CONFLICT DO NOTHING RETURNING version"
)
_HANDLED = (
    "INSERT INTO handled_events (consumer, event_id) VALUES (%(c)s, %(e)s) "
    "ON CONFLICT DO NOTHING RETURNING event_id"
)
# A consumer's fetched batch marked in one statement instead of one per event (the ids are
# distinct: Tx.mark_handled_many sees to that).
_HANDLED_MANY = (
    "INSERT INTO handled_events (consumer, event_id) "
    "SELECT %(c)s, e FROM unnest(%(e)s::text[]) WITH ORDINALITY AS u(e, n) ORDER BY n "
    "ON CONFLICT DO NOTHING RETURNING event_id"
)
# lock_stream in one statement: create the stream's row at version 0 if it has none (a new
# stream, locked by this transaction until it ends; a concurrent creator waits on the key), and
# lock it FOR UPDATE if it has one. Both parts read the statement's snapshot, so a row that a
# concurrent creator committed while the insert waited on it is in neither: lock_stream then
# asks again, as it did when these were two statements (a SELECT, then the INSERT).
_LOCK_OR_CREATE = """
WITH created AS (
  INSERT INTO streams (stream_id, version) VALUES (%(s)s, 0)
  ON CONFLICT DO NOTHING RETURNING version
), locked AS (
  SELECT version FROM streams WHERE stream_id = %(s)s FOR UPDATE
)
SELECT version, true AS created FROM created UNION ALL SELECT version, false FROM locked
"""
# lock_streams in one statement, the same for many streams: the missing rows created first (in
# stream order), then the existing ones locked (in stream order, so two batches never deadlock):
# UNION ALL reads its branches in order, and each part runs when first read.
_LOCK_OR_CREATE_MANY = """
WITH created AS (
  INSERT INTO streams (stream_id, version)
  SELECT s, 0 FROM unnest(%(ids)s::text[]) AS s ORDER BY s
  ON CONFLICT DO NOTHING RETURNING stream_id
), locked AS (
  SELECT stream_id, version FROM streams WHERE stream_id = ANY(%(ids)s::text[])
  ORDER BY stream_id FOR UPDATE
)
SELECT stream_id, 0::bigint AS version, true AS created FROM created
UNION ALL SELECT stream_id, version, false FROM locked
"""
_DROP_PLACEHOLDERS = "DELETE FROM streams WHERE stream_id = ANY(%(ids)s::text[]) AND version = 0"
# append_many's streams moved and their events inserted in one statement, all or nothing: the
# events are written only if every stream was at its expected version (the count of moved
# streams; each stream appears once). When one was not, the streams that did move are put back
# by _MOVE (rare: the streams were locked first) and nothing else was written.
_APPEND_ALL = """
WITH m AS (
  SELECT * FROM unnest(%(streams)s::text[], %(old)s::bigint[], %(new)s::bigint[])
    AS m(stream_id, old, new)
), moved AS (
  UPDATE streams SET version = m.new FROM m
  WHERE streams.stream_id = m.stream_id AND streams.version = m.old
  RETURNING streams.stream_id
), written AS (
  INSERT INTO events (event_id, stream_id, stream_version, event_type, envelope)
  SELECT e.event_id, e.stream_id, e.stream_version, e.event_type, e.envelope
  FROM unnest(%(ids)s::text[], %(event_streams)s::text[], %(versions)s::bigint[],
              %(types)s::text[], %(envelopes)s::bytea[])
    WITH ORDINALITY AS e(event_id, stream_id, stream_version, event_type, envelope, n)
  WHERE (SELECT count(*) FROM moved) = cardinality(%(streams)s::text[])
  ORDER BY e.n
  RETURNING 1
)
SELECT stream_id FROM moved
"""
_MOVE = (
    "UPDATE streams SET version = m.new FROM unnest("
    "%(streams)s::text[], %(old)s::bigint[], %(new)s::bigint[]) AS m(id, old, new) "
    "WHERE streams.stream_id = m.id AND streams.version = m.old RETURNING streams.stream_id"
)
_VERSION = "SELECT version FROM streams WHERE stream_id = %(s)s"


async def _one(
    raw: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any]
) -> tuple[Any, ...] | None:
    """The first row of a prepared statement on ``raw`` (driver errors wrapped as SQLAlchemy
    wraps them, see :func:`_append_rows`)."""
    try:
        cur = await raw.execute(statement, params, prepare=True)
        return await cur.fetchone()
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, params, exc, psycopg.Error) from exc


async def _all(
    raw: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Every row of a prepared statement on ``raw`` (errors wrapped as :func:`_one`'s)."""
    try:
        cur = await raw.execute(statement, params, prepare=True)
        return await cur.fetchall()
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, params, exc, psycopg.Error) from exc


class Tx:
    """One database transaction: load state, lock streams, append, record handled events."""

    def __init__(self, conn: AsyncConnection, store: EventStore) -> None:
        self.conn = conn
        self._store = store
        self.appended = 0
        self._placeholders: set[str] = set()  # streams this tx created at version 0 to lock

    async def lock_stream(self, stream_id: str) -> int:
        """Lock the stream's row until commit and return its version (0 if it has none yet).

        Writers of a hot stream (a budget pool) queue here instead of failing on a version
        conflict and retrying; so do the first writers of a stream that does not exist yet.
        One statement (:data:`_LOCK_OR_CREATE`), new stream or not.
        """
        raw = await driver(self.conn)
        while True:
            row = await _one(raw, _LOCK_OR_CREATE, {"s": stream_id})
            if row is None:
                # Another transaction created it while this one waited on its key: its row
                # was not in this statement's snapshot. Lock it now.
                continue
            if row[1]:
                # A new stream had no row to lock: this transaction created one at version 0,
                # which it holds (a concurrent creator waits on the unique key until this one
                # ends). Whether a stream EXISTS is read from its row in ``streams`` (the
                # ledger's _was_refused does so). This row at version 0 is visible to no other
                # transaction: it is rolled back with this one, and deleted before commit if
                # nothing was appended to the stream (see EventStore.transaction). Only this
                # transaction itself sees it: test existence BEFORE locking a stream, or test
                # ``version > 0``.
                self._placeholders.add(stream_id)
            return int(row[0])

    async def lock_streams(self, streams: Sequence[str]) -> dict[str, int]:
        """:meth:`lock_stream` for many streams in one statement (:data:`_LOCK_OR_CREATE_MANY`):
        create the missing ones (locked by this transaction until it ends; a concurrent creator
        waits on the key), then lock the existing ones, in stream order so two batches never
        deadlock. Returns each stream's version (0 for a new one)."""
        raw = await driver(self.conn)
        versions: dict[str, int] = {}
        wanted = sorted(set(streams))
        while wanted:  # once, unless a concurrent creator committed a row while we waited on it
            rows = await _all(raw, _LOCK_OR_CREATE_MANY, {"ids": wanted})
            # Placeholders, as lock_stream's: dropped before commit if nothing is appended.
            self._placeholders.update(r[0] for r in rows if r[2])
            versions.update({r[0]: int(r[1]) for r in rows})
            # Such a row was in neither part's snapshot (and a concurrent creator's placeholder
            # that was rolled back is gone): ask for those again.
            wanted = [s for s in wanted if s not in versions]
        return versions

    async def _drop_unused_placeholders(self) -> None:
        """Delete the version-0 rows lock_stream created for streams nothing was appended to,
        so that a stream's row never outlives its lock without an event."""
        if self._placeholders:
            ids = sorted(self._placeholders)
            raw = await driver(self.conn)
            try:
                await raw.execute(_DROP_PLACEHOLDERS, {"ids": ids}, prepare=True)
            except psycopg.Error as exc:
                raise DBAPIError.instance(_DROP_PLACEHOLDERS, None, exc, psycopg.Error) from exc
            self._placeholders.clear()

    async def append(
        self, stream_id: str, expected_version: int, envelopes: Sequence[Envelope]
    ) -> int:
        """Append ``envelopes`` after ``expected_version``; return the new version.

        A stream not at ``expected_version`` (or, for a version above 0, with no row at all)
        raises :class:`WrongExpectedVersion` and nothing is written; the transaction goes on.
        """
        if not envelopes:
            return expected_version
        append = _Append(
            stream_id, expected_version, _event_rows(stream_id, expected_version, envelopes)
        )
        (result,) = await _append_rows(await driver(self.conn), [append])
        if isinstance(result, WrongExpectedVersion):
            raise result
        self.appended += len(append.rows)
        # Its row now holds events: nothing to drop at commit (a new stream's command would
        # otherwise pay a DELETE that deletes nothing, a round trip, before its COMMIT).
        self._placeholders.discard(stream_id)
        return result

    async def append_many(self, appends: Sequence[tuple[str, int, Sequence[Envelope]]]) -> None:
        """:meth:`append` for many ``(stream, expected_version, envelopes)`` in one statement
        (:data:`_APPEND_ALL`; the streams locked first, e.g. by :meth:`lock_streams`; each
        appears once).

        A stream not at its expected version raises :class:`WrongExpectedVersion` and nothing
        is written, to that stream or any other.
        """
        moved = [(s, v, v + len(envs)) for s, v, envs in appends if envs]
        if not moved:
            return
        rows = [row for s, v, envs in appends if envs for row in _event_rows(s, v, envs)]
        raw = await driver(self.conn)
        params = {
            "streams": [s for s, _, _ in moved],
            "old": [v for _, v, _ in moved],
            "new": [n for _, _, n in moved],
            "ids": [r["event_id"] for r in rows],
            "event_streams": [r["stream_id"] for r in rows],
            "versions": [r["stream_version"] for r in rows],
            "types": [r["event_type"] for r in rows],
            "envelopes": [r["envelope"] for r in rows],
        }
        updated = {r[0] for r in await _all(raw, _APPEND_ALL, params)}
        missed = {s for s, _, _ in moved} - updated
        if missed:
            # No event was written; put back the streams the statement moved (it locked their
            # rows), so a refusal leaves the transaction as it found it, as append's does.
            back = [(s, n, v) for s, v, n in moved if s in updated]
            if back:
                await _all(
                    raw,
                    _MOVE,
                    {
                        "streams": [s for s, _, _ in back],
                        "old": [o for _, o, _ in back],
                        "new": [n for _, _, n in back],
                    },
                )
            stream = min(missed)
            expected = next(v for s, v, _ in moved if s == stream)
            actual = await _one(raw, _VERSION, {"s": stream})
            raise WrongExpectedVersion(stream, expected, int(actual[0]) if actual else 0)
        self.appended += len(rows)
        # Their rows now hold events: nothing to drop at commit (keeps that DELETE small).
        self._placeholders.difference_update(updated)

    async def emit(
        self,
        service: str,
        stream_id: str,
        expected_version: int,
        events: Sequence[Message],
        ctx: Context,
        project: Projector,
    ) -> list[Envelope]:
        """Wrap ``events``, append them, and apply each to the service's read models."""
        envs = [new_envelope(service, stream_id, e, ctx) for e in events]
        await self.append(stream_id, expected_version, envs)
        for env in envs:
            await project(self.conn, env)
        return envs

    async def mark_handled(self, consumer: str, event_id: str) -> bool:
        """Record that ``consumer`` handled ``event_id``; False if it already had."""
        row = await _one(await driver(self.conn), _HANDLED, {"c": consumer, "e": event_id})
        return row is not None

    async def mark_handled_many(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """:meth:`mark_handled` for many events in one statement: the ids among ``event_ids``
        that ``consumer`` had not handled before (each counted once however often it is
        given)."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return set()
        rows = await _all(await driver(self.conn), _HANDLED_MANY, {"c": consumer, "e": ids})
        return {r[0] for r in rows}


# The oldest transaction id a reader of the events table must not reach: the oldest transaction
# still running in *this* database, or the next id when none is. PostgreSQL's snapshot xmin
# (pg_snapshot_xmin) is cluster-wide, so with several services' databases on one server a long
# transaction in catalog's database would hold back ledger's relay. Transaction ids are
# cluster-wide but a backend belongs to one database and can only write there, so the running ids
# that pg_stat_activity shows in another database are left out (backend_xid is visible to every
# role). Any other running id of the snapshot counts, including one that committed between the
# snapshot and the pg_stat_activity read, or a prepared transaction: when in doubt, wait a poll.
READ_HORIZON = (
    "(SELECT LEAST(pg_snapshot_xmax(snap.s), ("
    "SELECT min(x) FROM pg_snapshot_xip(snap.s) AS x WHERE NOT EXISTS ("
    "SELECT 1 FROM pg_stat_activity a WHERE a.backend_xid = x::xid "
    "AND a.datid IS DISTINCT FROM (SELECT oid FROM pg_database WHERE datname = current_database()))"
    ")) FROM (SELECT pg_current_snapshot() AS s) AS snap)"
)


# The relay's statements, compiled once and run prepared in autocommit (one round trip each: no
# BEGIN and no ROLLBACK around a single statement). The read is one statement, so it reads one
# snapshot as it did in a transaction of its own; so is the checkpoint's upsert.
_READ_ALL = Statement(
    text(
        "SELECT tx_id::text::bigint AS tx_id, position, envelope FROM events "
        "WHERE (tx_id, position) > (CAST(CAST(:tx AS text) AS xid8), :pos) "
        f"AND tx_id < {READ_HORIZON} "
        "ORDER BY tx_id, position LIMIT :limit"
    ),
    name="read_all",
)
_LOAD_CHECKPOINT = Statement(
    text("SELECT tx_id, position FROM checkpoints WHERE name = :n"), name="load_checkpoint"
)
_SAVE_CHECKPOINT = Statement(
    text(
        "INSERT INTO checkpoints (name, tx_id, position) VALUES (:n, :t, :p) "
        "ON CONFLICT (name) DO UPDATE SET tx_id = :t, position = :p"
    ),
    name="save_checkpoint",
)

# What a store's commits are announced on to the other processes of its database (several
# workers: only the leader runs the relay, services/kernel/workers.py). The NOTIFY goes after
# the commit, in a statement of its own, never inside the appending transaction: PostgreSQL
# serialises the commits of notifying transactions on one cluster-wide lock held through the
# commit's WAL flush (async.c, PreCommit_Notify), which would undo group commit for every
# service sharing the server. Without a durable commit of its own to wait for
# (synchronous_commit off for that one statement's transaction) it costs one short round trip.
APPENDED_CHANNEL = "subsidy_appended"
_NOTIFY = Statement(
    text("SELECT pg_notify(:channel, ''), set_config('synchronous_commit', 'off', true)"),
    name="notify",
)


class EventStore:
    """A service's event store. One per process; safe for concurrent use."""

    def __init__(
        self, engine: AsyncEngine, *, max_batch: int = 256, across_processes: bool = False
    ) -> None:
        self.engine = engine
        self.appended = asyncio.Event()  # set after a commit that appended: wakes the relay
        # Whether other processes append to this database too (several workers): each commit
        # that appended is then announced on APPENDED_CHANNEL, for the relay wherever it runs
        # (OutboxRelay.wake_across_processes), unless this process's relay listens itself.
        self.across_processes = across_processes
        self.listening = False  # this process's relay LISTENs: its own wake is in-process
        self._announce_due = False
        self._announcer: asyncio.Task[None] | None = None
        # append's group commit: the appends that arrive while a batch commits are the next
        # batch (one at a time per process), one stream at most once in a batch.
        self._appends: GroupCommit[None, _Append, int] = GroupCommit(
            self._commit_appends, max_batch=max_batch, distinct=lambda a: a.stream_id
        )

    async def create_tables(self, *metadatas: MetaData) -> None:
        """Create the kernel's tables and the given ones straight from the models; idempotent.

        For tests of the kernel and of single components on a scratch database only: a
        service's database is migrated by its Alembic revisions (services/kernel/schema.py),
        and no service calls this."""
        async with self.engine.begin() as conn:
            # Several tests may create one database's tables at once.
            await conn.execute(text("SELECT pg_advisory_xact_lock(7340001)"))
            for md in (kernel_metadata, *metadatas):
                await conn.run_sync(md.create_all)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A unit of work: everything inside commits together or not at all."""
        async with self.engine.connect() as conn:
            tx = Tx(conn, self)
            async with conn.begin():
                yield tx
                await tx._drop_unused_placeholders()
            if tx.appended:
                self._committed()

    async def append(
        self, stream_id: str, expected_version: int, envelopes: Sequence[Envelope]
    ) -> int:
        """Append ``envelopes`` to one stream after ``expected_version``, in a transaction of
        its own; return the new version. A conflict raises :class:`WrongExpectedVersion` and
        writes nothing.

        Group commit: concurrent appends (to different streams) share one transaction, one
        statement and one WAL flush. Each is still all or nothing on its own: a stream not at
        its expected version gets nothing and its caller alone sees the conflict, while the
        others of its batch commit. Two appends to one stream are never in one batch: the
        second waits for the next, and so conflicts exactly as it would alone.
        """
        if not envelopes:
            return expected_version
        rows = _event_rows(stream_id, expected_version, envelopes)  # sizes checked here
        return await self._appends.submit(None, _Append(stream_id, expected_version, rows))

    async def _commit_appends(
        self, _: None, batch: Sequence[_Append]
    ) -> Sequence[int | BaseException]:
        """One batch of :meth:`append`: one statement in autocommit (its own transaction: no
        BEGIN or COMMIT round trip). If the statement fails as a whole (a duplicate event id,
        a deadlock with another process's batch), each append is tried again alone, so that
        the failure reaches its own caller only."""
        results: list[int | BaseException]
        try:
            results = [*await self._run_appends(batch)]
        except DBAPIError as exc:
            # A deadlock or serialization failure is the batch's (two processes' batches
            # locking streams in different orders), not any one append's.
            outage = isinstance(exc.orig, psycopg.OperationalError | psycopg.InterfaceError)
            if len(batch) == 1 or (outage and not isinstance(exc.orig, TransactionRollback)):
                raise  # the one append's own error, or an outage: every caller sees it
            results = []
            for one in batch:
                try:
                    results += await self._run_appends([one])
                except DBAPIError as own:
                    results.append(own)
        if any(not isinstance(r, BaseException) for r in results):
            self._committed()
        return results

    def _committed(self) -> None:
        """After a commit that appended: wake this process's relay, and announce it to the
        other processes' (at most one NOTIFY in flight: the commits meanwhile share the next,
        so every commit is followed by a NOTIFY sent after it)."""
        self.appended.set()
        if self.across_processes and not self.listening:
            self._announce_due = True
            if self._announcer is None:
                self._announcer = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        try:
            while self._announce_due:
                self._announce_due = False
                async with self._autocommit() as conn:
                    await _NOTIFY.run(conn, channel=APPENDED_CHANNEL)
        except Exception as exc:
            # Not lost: the relay's idle poll finds what this one would have announced.
            log.warning("could not announce a commit to the relay (%s)", type(exc).__name__)
        finally:
            self._announcer = None

    @asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection in autocommit, for statements run on psycopg directly (each its
        own transaction: no BEGIN, COMMIT or ROLLBACK round trip). One that broke under them
        is invalidated here: SQLAlchemy did not see it fail, and resetting it on its way back
        into the pool would fail (and log) instead."""
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            try:
                yield conn
            except DBAPIError as exc:
                await invalidate_if_broken(conn, exc)
                raise

    async def _run_appends(self, batch: Sequence[_Append]) -> list[int | WrongExpectedVersion]:
        async with self._autocommit() as conn:
            return await _append_rows(await driver(conn), batch)

    async def read_stream(self, stream_id: str, from_version: int = 1) -> list[Envelope]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                text(
                    "SELECT envelope FROM events WHERE stream_id = :s AND stream_version >= :v "
                    "ORDER BY stream_version"
                ),
                {"s": stream_id, "v": from_version},
            )
            return [Envelope.FromString(r[0]) for r in result]

    async def read_all(self, after: Position = START, limit: int = 500) -> list[Recorded]:
        """Events after ``after`` in the global order, never past a still-running writer."""
        async with self._autocommit() as conn:
            rows = await _READ_ALL.all(conn, tx=after.tx_id, pos=after.position, limit=limit)
        return [
            Recorded(Position(int(r.tx_id), int(r.position)), Envelope.FromString(r.envelope))
            for r in rows
        ]

    async def rebuild(self, tables: Sequence[Table], project: Projector) -> int:
        """Empty ``tables`` and replay every event of this store through ``project``, in one
        transaction; returns how many events were applied. Run it with the service quiesced:
        a consumer handling an event meanwhile would update rows being replaced."""
        async with self.transaction() as tx:
            for table in tables:
                await tx.conn.execute(table.delete())
            pos, n = START, 0
            while True:
                batch = await self.read_all(pos, limit=1000)
                if not batch:
                    return n
                for rec in batch:
                    await project(tx.conn, rec.envelope)
                    pos, n = rec.position, n + 1

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(text("SELECT count(*) FROM events")) or 0)

    async def backlog(self, after: Position) -> tuple[int, float]:
        """How many events lie after ``after`` (committed, in the global order) and how many
        seconds ago the oldest of them was recorded (0.0 when there is none): the relay's lag."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at)),"
                        " 0) FROM events "
                        "WHERE (tx_id, position) > (CAST(CAST(:tx AS text) AS xid8), :pos)"
                    ),
                    {"tx": after.tx_id, "pos": after.position},
                )
            ).one()
            return int(row[0]), max(0.0, float(row[1]))

    async def load_checkpoint(self, name: str) -> Position:
        async with self._autocommit() as conn:
            row = await _LOAD_CHECKPOINT.first(conn, n=name)
        return Position(int(row.tx_id), int(row.position)) if row else START

    async def save_checkpoint(self, name: str, pos: Position) -> None:
        # One upsert, in autocommit: atomic by itself, one round trip.
        async with self._autocommit() as conn:
            await _SAVE_CHECKPOINT.run(conn, n=name, t=pos.tx_id, p=pos.position)
