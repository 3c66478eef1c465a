"""Storage is append-only where it must be, in PostgreSQL itself: a service's runtime role can
append to and read its events table (and the audit service's, its log) but never rewrite or
erase it; schema migrations run as a separate role that owns the tables.

Real PostgreSQL; the runtime role is the one services run as in every test (tests/conftest.py)
and, with its own per-service roles, in the local stack (subsidyctl/stack/postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from services.audit import log as audit_log
from services.audit.service import SPEC as AUDIT
from services.catalog.service import SPEC as CATALOG
from services.kernel.app import ServiceSpec, migrate_only
from services.kernel.events import Context, new_envelope
from services.kernel.eventstore import EventStore, make_engine
from services.kernel.settings import Settings
from subsidy.v1 import common_pb2, events_pb2
from subsidyctl.stack import Postgres, free_port
from subsidyctl.stack.postgres import ServiceDatabase
from tests.conftest import Infra

FORBIDDEN = {
    "UPDATE": "UPDATE {table} SET {column} = {column}",
    "DELETE": "DELETE FROM {table}",
    "TRUNCATE": "TRUNCATE {table}",
}


@dataclass
class Stores:
    database: ServiceDatabase
    runtime: EventStore
    owner: EventStore


def _settings(database: ServiceDatabase, service: str) -> Settings:
    return Settings(
        service=service,
        grpc_listen="127.0.0.1:0",
        database_url=database.runtime_url,
        migration_database_url=database.migration_url,
        nats_url="nats://127.0.0.1:1",
        vault_addr="http://127.0.0.1:1",
        vault_token="unused",
        vault_k8s_role=None,
        tls_source="vault",
    )


async def _migrated(infra: Infra, prefix: str, spec: ServiceSpec) -> Stores:
    database = infra.create_service_database(prefix)
    # What the chart's migration Job runs: `python -m services.<name> migrate`.
    await migrate_only(spec, _settings(database, spec.name))
    return Stores(
        database,
        EventStore(make_engine(database.runtime_url, pool_size=1)),
        EventStore(make_engine(database.migration_url, pool_size=1)),
    )


@pytest.fixture
async def catalog_db(infra: Infra) -> AsyncIterator[Stores]:
    stores = await _migrated(infra, "append_only", CATALOG)
    yield stores
    await stores.runtime.engine.dispose()
    await stores.owner.engine.dispose()


@pytest.fixture
async def audit_db(infra: Infra) -> AsyncIterator[Stores]:
    stores = await _migrated(infra, "append_only_audit", AUDIT)
    yield stores
    await stores.runtime.engine.dispose()
    await stores.owner.engine.dispose()


def _event(n: int) -> events_pb2.ProductRegistered:
    return events_pb2.ProductRegistered(sku=f"sku-{n}", merchant_id="m-1", list_price_fen=100)


async def _refused(store: EventStore, statement: str) -> str:
    """Run ``statement`` as ``store``'s role; the PostgreSQL error it must fail with."""
    with pytest.raises(ProgrammingError) as err:
        async with store.engine.begin() as conn:
            await conn.execute(text(statement))
    assert isinstance(err.value.orig, psycopg.errors.InsufficientPrivilege), err.value
    return str(err.value.orig)


async def _count(store: EventStore, table: str) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


async def test_the_runtime_role_appends_and_reads_events_but_never_rewrites_them(
    catalog_db: Stores,
) -> None:
    runtime = catalog_db.runtime
    ctx = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_SERVICE, id="catalog"))
    # INSERT works (through the store's own append), and so does reading back.
    envs = [new_envelope("catalog", "product/sku-1", _event(i), ctx) for i in range(3)]
    assert await runtime.append("product/sku-1", 0, envs) == 3
    assert [e.event_id for e in await runtime.read_stream("product/sku-1")] == [
        e.event_id for e in envs
    ]
    for verb, statement in FORBIDDEN.items():
        message = await _refused(runtime, statement.format(table="events", column="event_type"))
        assert "permission denied for table events" in message, verb
    assert await _count(runtime, "events") == 3  # nothing changed


async def test_read_models_stay_writable_and_the_owner_is_not_the_runtime_role(
    catalog_db: Stores,
) -> None:
    runtime, owner = catalog_db.runtime, catalog_db.owner
    async with runtime.engine.begin() as conn:
        # Bookkeeping and read models: written, rewritten and emptied by design.
        await conn.execute(
            text("INSERT INTO checkpoints (name, tx_id, position) VALUES ('t', 1, 1)")
        )
        await conn.execute(text("UPDATE checkpoints SET position = 2 WHERE name = 't'"))
        await conn.execute(text("DELETE FROM checkpoints WHERE name = 't'"))
        await conn.execute(text("DELETE FROM sales_orders"))
        who = await conn.scalar(text("SELECT current_user"))
        owners = set(
            (
                await conn.execute(
                    text("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalars()
        )
    assert who == catalog_db.database.runtime.user
    assert owners == {catalog_db.database.migration.user}
    # The runtime role cannot change the schema either: it owns nothing.
    for ddl in ("DROP TABLE events", "ALTER TABLE events DISABLE TRIGGER ALL"):
        assert "must be owner of table events" in await _refused(runtime, ddl)
    assert "permission denied for schema public" in await _refused(
        runtime, "CREATE TABLE shadow_events (n int)"
    )
    # Privileges are granted to it, without grant option: granting itself more is a no-op
    # (PostgreSQL only warns) and the log stays closed.
    async with runtime.engine.begin() as conn:
        await conn.execute(text(f"GRANT DELETE ON events TO {catalog_db.database.runtime.user}"))
    await _refused(runtime, "DELETE FROM events")
    # The migration role, which owns the tables, still can (a repair is a deliberate act).
    async with owner.engine.begin() as conn:
        await conn.execute(text("UPDATE events SET event_type = event_type"))


async def test_the_audit_log_is_append_only_for_the_audit_runtime_role(audit_db: Stores) -> None:
    runtime = audit_db.runtime
    await audit_log.ensure_head(runtime)  # at start, as the runtime role: INSERT on the head
    ctx = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_SERVICE, id="catalog"))
    for i in range(2):
        async with runtime.transaction() as tx:
            await audit_log.append(tx, new_envelope("catalog", f"product/s{i}", _event(i), ctx))
    size, _, by_service = await audit_log.info(runtime)
    assert (size, by_service) == (2, {"catalog": 2})
    for verb, statement in FORBIDDEN.items():
        message = await _refused(runtime, statement.format(table="audit_entries", column="service"))
        assert "permission denied for table audit_entries" in message, verb
    # The head is advanced by every append (UPDATE) but never deleted or emptied.
    for statement in ("DELETE FROM audit_head", "TRUNCATE audit_head"):
        assert "permission denied for table audit_head" in await _refused(runtime, statement)
    assert await _count(runtime, "audit_entries") == 2
    # The audit service's own events table is append-only too.
    assert "permission denied for table events" in await _refused(runtime, "DELETE FROM events")


async def test_migrating_again_keeps_the_grants_exact(catalog_db: Stores) -> None:
    """A second migration (every rolling upgrade) revokes before it grants: privileges an
    operator added by hand on the events table do not survive it."""
    database = catalog_db.database
    async with catalog_db.owner.engine.begin() as conn:
        await conn.execute(text(f"GRANT UPDATE, DELETE ON events TO {database.runtime.user}"))
    await migrate_only(CATALOG, _settings(database, "catalog"))
    await _refused(catalog_db.runtime, "DELETE FROM events")


@pytest.fixture
def stack_pg(tmp_path: Path) -> Iterator[Postgres]:
    pg = Postgres(
        data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path / "log", durable=False
    )
    pg.start()
    yield pg
    pg.stop()


def test_local_postgres_trusts_no_login(stack_pg: Postgres) -> None:
    pg = stack_pg
    assert pg.password_file is not None
    assert pg.password_file.stat().st_mode & 0o777 == 0o600
    nobody = f"host=127.0.0.1 port={pg.port} dbname=postgres"
    for user in ("postgres", "catalog_runtime"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"{nobody} user={user}", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{nobody} user=postgres password=wrong", connect_timeout=5)
    hba = (pg.data_dir / "pg_hba.conf").read_text()
    assert "trust" not in hba.replace("# Written", "")
    with psycopg.connect(pg.conninfo("postgres")) as db:
        assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        methods = {r[0] for r in db.execute("SELECT auth_method FROM pg_hba_file_rules")}
    assert methods == {"scram-sha-256"}


def test_each_service_database_has_its_own_two_roles(stack_pg: Postgres) -> None:
    catalog, ledger = stack_pg.service_database("catalog"), stack_pg.service_database("ledger")
    assert (catalog.migration.user, catalog.runtime.user) == (
        "catalog_migration",
        "catalog_runtime",
    )
    with psycopg.connect(stack_pg.conninfo("catalog", catalog.runtime)) as db:
        row = db.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False)
    # One service's roles cannot even connect to another service's database.
    for login in (catalog.runtime, catalog.migration):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(stack_pg.conninfo("ledger", login), connect_timeout=5)
    with psycopg.connect(stack_pg.conninfo("ledger", ledger.migration)) as db:
        assert db.execute("SELECT current_database()").fetchone() == ("ledger",)
    # A new start gives new passwords: the old ones stop working.
    again = stack_pg.service_database("catalog")
    assert again.runtime.password != catalog.runtime.password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(stack_pg.conninfo("catalog", catalog.runtime), connect_timeout=5)


def test_a_data_directory_from_the_trusting_days_gets_a_password(tmp_path: Path) -> None:
    """A run folder made before passwords (its pg_hba.conf trusted every login, no password
    file): the next start sets a superuser password and stops trusting."""
    pg = Postgres(data_dir=tmp_path / "pg", port=free_port(), log_dir=tmp_path, durable=False)
    pg.start()
    pg.stop()
    assert pg.password_file is not None
    old = pg.password_file.read_text()
    pg.password_file.unlink()
    (pg.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\n"
    )
    with pg:
        assert pg.password_file.read_text() != old
        with psycopg.connect(pg.conninfo("postgres")) as db:
            assert db.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres")


def test_the_local_stack_runs_each_service_as_its_runtime_role(tmp_path: Path) -> None:
    """Each service is given its runtime role's URL and its migration role's, neither with a
    password in it: the passwords are in 0600 files Settings splices in."""
    from sqlalchemy.engine import make_url

    from subsidyctl.localstack import SERVICES, LocalStack, Ports

    stack = LocalStack(tmp_path, Ports(7100))
    stack.pg = Postgres(data_dir=tmp_path / "pg", port=7132, log_dir=tmp_path)
    for service in SERVICES:
        env = stack._database_env(service)
        runtime, owner = (
            make_url(env[f"SUBSIDY_{kind}DATABASE_URL"]) for kind in ("", "MIGRATION_")
        )
        assert (runtime.username, runtime.password) == (f"{service}_runtime", None)
        assert (owner.username, owner.password) == (f"{service}_migration", None)
        assert runtime.database == owner.database == service
        assert env["SUBSIDY_DATABASE_PASSWORD_FILE"].startswith(str(tmp_path / "secrets"))
        assert (
            env["SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE"] != env["SUBSIDY_DATABASE_PASSWORD_FILE"]
        )
