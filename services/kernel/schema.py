"""Each service's database schema, versioned by Alembic revisions committed with the service.

A service's revisions live in ``services/<service>/migrations/versions/`` (the environment,
``env.py``, is the same two lines for every service and calls :func:`run_env`); the version
table is Alembic's ``alembic_version`` in the service's own database, so each service owns its
schema's history as it owns its data. Everything runs from the installed package: the script
location is a package resource and the configuration is built here, so no ``alembic.ini`` is
needed at run time.

- :func:`upgrade` (``python -m services.<name> migrate``, the chart's migration Job, the local
  stack and the tests before they start a service): as the migration role, which owns the
  tables, upgrade to head in one transaction, replay the read models when a revision asks for
  it (``rebuild_read_models = True`` in the revision: a new column that only the events can
  fill), and grant the runtime role exactly what each table declares
  (:func:`~services.kernel.eventstore.grant_statements`: the events table append-only) and
  ``SELECT`` on the version table, so the service can check it.
- :func:`require_current`: at start, a service reads the version and refuses to start on a
  database that is behind (or was never migrated), naming the command that fixes it. A version
  this release does not know is a newer release's (a rollback, or old pods during a rolling
  upgrade): it starts with a warning, which is why revisions are written expand-then-contract.
- A database created before migrations existed (by ``create_all``) has the tables but no
  version: :func:`upgrade` stamps it at the first revision (the schema of the release before
  migrations) and upgrades from there; revisions after the first that such a database may
  partly have already are written to tolerate it (``if_not_exists``).
- :func:`differences`: what the models declare and a migrated database lacks (or has extra);
  tests/kernel/test_migrations.py requires it empty for every service, so a model change
  without its revision fails CI. ``subsidyctl schema revision SERVICE -m MESSAGE`` writes the
  next revision from that difference (docs/operations.md, "Adding a revision").
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, Table, bindparam, exc, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .events import Envelope
from .eventstore import START, EventStore, Position, Projector, grant_statements, kernel_metadata

log = logging.getLogger(__name__)

VERSION_TABLE = "alembic_version"
# Taken by every migration of one database: several Jobs or processes may migrate at once.
MIGRATION_LOCK = 7340001
# The first revision of every service: the schema of the release before migrations existed.
BASELINE = "0001"
# A revision module that sets this makes the migration replay the service's read models.
REBUILD_FLAG = "rebuild_read_models"


class SchemaNotCurrent(RuntimeError):
    """The service's database is not at the revision this release needs; says how to fix it."""


@dataclass(frozen=True)
class Schema:
    """One service's schema: its tables (the kernel's and its own) and its revisions."""

    service: str
    metadata: tuple[MetaData, ...]
    package: str  # the migrations package, e.g. "services.ledger.migrations"

    @classmethod
    def of(cls, service: str, metadata: MetaData) -> Schema | None:
        """The schema of ``service`` if it ships revisions (``services.<service>.migrations``);
        None for a service that does not (a test's service)."""
        package = f"services.{service}.migrations"
        try:
            found = importlib.util.find_spec(package)
        except ModuleNotFoundError:  # no services.<service> package at all
            found = None
        if found is None:
            return None
        return cls(service, (kernel_metadata, metadata), package)

    @property
    def command(self) -> str:
        """What an operator runs to bring the database to head."""
        return f"python -m services.{self.service} migrate"

    def tables(self) -> MetaData:
        """The kernel's tables and the service's in one MetaData (what Alembic compares)."""
        combined = MetaData()
        for md in self.metadata:
            for table in md.tables.values():
                table.to_metadata(combined)
        return combined

    def config(self, connection: Connection | None = None) -> Config:
        """Alembic's configuration, built here rather than read from an ini file."""
        cfg = Config()
        cfg.set_main_option("script_location", f"{self.package}:.")
        # Revision files are modules: a name that is a valid identifier keeps mypy and ruff happy.
        cfg.set_main_option("file_template", "r%%(rev)s_%%(slug)s")
        cfg.set_main_option("version_path_separator", "os")
        cfg.attributes["schema"] = self
        if connection is not None:
            cfg.attributes["connection"] = connection
        return cfg

    def script(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config())

    def head(self) -> str:
        """This release's head revision (one line of history per service)."""
        head = self.script().get_current_head()
        if head is None:
            raise RuntimeError(f"{self.package} has no revisions")
        return head

    def rebuild(self) -> Callable[[EventStore], Any] | None:
        """The service's read-model replay, if its migrations package exports one."""
        module = importlib.import_module(self.package)
        rebuild: Callable[[EventStore], Any] | None = getattr(module, "rebuild", None)
        return rebuild


def run_env(service: str) -> None:
    """The body of every service's ``env.py``: run the revisions on the connection
    :func:`upgrade` (or the revision command) shares, against the service's own MetaData."""
    from alembic import context

    cfg = context.config
    schema: Schema | None = cfg.attributes.get("schema")
    if schema is None:  # run by a plain `alembic` command line: find the service's tables
        spec = importlib.import_module(f"services.{service}.service").SPEC
        schema = Schema.of(service, spec.metadata)
        assert schema is not None
    options: dict[str, Any] = {
        "target_metadata": schema.tables(),
        "compare_type": True,
        "version_table": VERSION_TABLE,
    }
    if context.is_offline_mode():  # `--sql`: the statements, for a DBA to read
        context.configure(url=cfg.get_main_option("sqlalchemy.url"), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection: Connection | None = cfg.attributes.get("connection")
    if connection is None:
        raise RuntimeError(f"run the migrations with `{schema.command}`")
    context.configure(connection=connection, **options)
    with context.begin_transaction(), _xid8_unreflected():
        context.run_migrations()


@contextmanager
def _xid8_unreflected() -> Iterator[None]:
    """PostgreSQL's xid8 (events.tx_id) is unknown to SQLAlchemy's reflection: it reads as
    NullType, which Alembic does not compare (the column's presence it still does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Did not recognize type 'xid8'", exc.SAWarning)
        yield


def _current(conn: Connection) -> tuple[str, ...]:
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_heads()


def _has_table(conn: Connection, name: str) -> bool:
    return bool(conn.dialect.has_table(conn, name))


def _upgrade(conn: Connection, schema: Schema, to: str) -> list[str]:
    """Upgrade on ``conn`` to ``to``; the revisions applied, oldest first."""
    before = _current(conn)
    if not before and _has_table(conn, "events"):
        # Made by create_all before migrations existed: it has at least the first revision.
        log.warning(
            "%s: a database without a schema version; stamping %s", schema.service, BASELINE
        )
        command.stamp(schema.config(conn), BASELINE)
        before = (BASELINE,)
    script = schema.script()
    applied = [
        s.revision
        for s in script.iterate_revisions(to, before[0] if before else "base")
        if s.revision not in before
    ]
    command.upgrade(schema.config(conn), to)
    return list(reversed(applied))


def _asks_rebuild(schema: Schema, revisions: Sequence[str]) -> bool:
    script = schema.script()
    return any(getattr(script.get_revision(r).module, REBUILD_FLAG, False) for r in revisions)


class _ReplayOnConnection(EventStore):
    """The event store seen from inside the migration's transaction: a service's
    ``projections.rebuild(store)`` empties and replays its read models on that connection, so
    the schema change and the rows it needs commit together (or not at all)."""

    def __init__(self, conn: AsyncConnection) -> None:
        super().__init__(conn.engine)
        self.conn = conn

    async def rebuild(self, tables: Sequence[Table], project: Projector) -> int:
        for table in tables:
            await self.conn.execute(table.delete())
        pos, n = START, 0
        while True:
            rows = (
                await self.conn.execute(
                    text(
                        "SELECT tx_id::text::bigint, position, envelope FROM events "
                        "WHERE (tx_id, position) > (CAST(CAST(:tx AS text) AS xid8), :pos) "
                        "ORDER BY tx_id, position LIMIT 1000"
                    ).bindparams(bindparam("tx"), bindparam("pos")),
                    {"tx": pos.tx_id, "pos": pos.position},
                )
            ).all()
            if not rows:
                return n
            for tx_id, position, envelope in rows:
                await project(self.conn, Envelope.FromString(envelope))
                pos, n = Position(int(tx_id), int(position)), n + 1


async def upgrade(
    engine: AsyncEngine, schema: Schema, *, runtime_role: str | None = None, to: str = "head"
) -> list[str]:
    """Bring the database to this release's head (or the revision ``to``: tests build an
    older schema so) in one transaction; returns the revisions applied. ``engine`` is the
    migration role's, which owns the tables; with ``runtime_role``, that role is granted what
    each table declares and may read the version (without it the connecting role owns
    everything: a dev setup)."""
    async with engine.begin() as conn:
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        applied = await conn.run_sync(_upgrade, schema, to)
        rebuild = schema.rebuild()
        if applied and rebuild is not None and _asks_rebuild(schema, applied):
            # No event may be appended while the read models are replayed from them.
            await conn.execute(text("LOCK TABLE events IN SHARE MODE"))
            replayed = await rebuild(_ReplayOnConnection(conn))
            log.info("%s: read models rebuilt from %d events", schema.service, replayed)
        if runtime_role is not None:
            # The tables there are (all of them at head; fewer at an older ``to``).
            present = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            granted = MetaData()
            for table in schema.tables().tables.values():
                if table.name in present:
                    table.to_metadata(granted)
            for statement in grant_statements((granted,), runtime_role, conn.dialect):
                await conn.execute(statement)
            role = conn.dialect.identifier_preparer.quote(runtime_role)
            await conn.execute(text(f"REVOKE ALL ON TABLE {VERSION_TABLE} FROM {role}"))
            await conn.execute(text(f"GRANT SELECT ON TABLE {VERSION_TABLE} TO {role}"))
    if applied:
        log.info("%s: schema upgraded through %s", schema.service, ", ".join(applied))
    return applied


def _status(conn: Connection, schema: Schema) -> tuple[str, ...] | None:
    """The database's revisions; None if it has no version table (never migrated)."""
    if not _has_table(conn, VERSION_TABLE):
        return None
    return _current(conn)


async def current(engine: AsyncEngine, schema: Schema) -> tuple[str, ...] | None:
    """The revisions the database is at (None: never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_status, schema)


async def require_current(engine: AsyncEngine, schema: Schema) -> None:
    """Refuse (:class:`SchemaNotCurrent`) unless the database is at this release's head; a
    revision this release does not know is a newer release's: start, with a warning."""
    at = await current(engine, schema)
    head = schema.head()
    if at is not None and head in at:
        return
    if not at:
        raise SchemaNotCurrent(
            f"{schema.service}: the database has no schema version (empty, or created before "
            f"migrations); this release needs revision {head}: run `{schema.command}` first"
        )
    script = schema.script()
    known = [r for r in at if _known(script, r)]
    if len(known) < len(at):
        log.warning(
            "%s: the database is at revision %s, newer than this release's %s; starting "
            "(revisions are expand-then-contract)",
            schema.service,
            ", ".join(at),
            head,
        )
        return
    raise SchemaNotCurrent(
        f"{schema.service}: the database is at revision {', '.join(at)}, this release needs "
        f"{head}: run `{schema.command}` first"
    )


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises its own ResolutionError subclasses for unknown ids
        return False


def _differences(conn: Connection, schema: Schema) -> list[Any]:
    ctx = MigrationContext.configure(
        conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    with _xid8_unreflected():
        return list(compare_metadata(ctx, schema.tables()))


async def differences(engine: AsyncEngine, schema: Schema) -> list[Any]:
    """What the models declare and the database does not have, or the other way round
    (Alembic's compare_metadata); empty when the revisions and the models agree."""
    async with engine.connect() as conn:
        return await conn.run_sync(_differences, schema)


def write_revision(connection: Connection, schema: Schema, message: str) -> str:
    """Write the next revision of ``schema`` (numbered after the head) from what the models
    have and the database on ``connection`` (at head) lacks; returns the file's path."""
    head = schema.head()
    rev_id = f"{int(head) + 1:04d}"
    cfg = schema.config(connection)
    script = command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic wrote no single revision")
    return str(script.path)


__all__ = [
    "BASELINE",
    "VERSION_TABLE",
    "Schema",
    "SchemaNotCurrent",
    "current",
    "differences",
    "require_current",
    "run_env",
    "upgrade",
    "write_revision",
]
