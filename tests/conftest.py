"""Session-scoped real infrastructure: PostgreSQL, NATS JetStream and OpenBao, started once.

No mocks of any of them: every test talks to the real servers over real connections.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from nats.js import JetStreamContext
from psycopg import sql
from sqlalchemy import create_engine

from services.kernel import bus, natsauth
from services.kernel.eventstore import EventStore, kernel_metadata, make_engine
from subsidyctl.stack import Nats, OpenBao, Postgres, free_port
from subsidyctl.stack.postgres import Login, ServiceDatabase
from tests.support.callers import Identities


@dataclass
class Infra:
    pg: Postgres
    nats: Nats
    bao: OpenBao
    root: Path
    migration: Login  # owns every test database (created once per session)
    runtime: Login  # what services run as: granted only what each table allows
    _identities: Identities | None = None

    @property
    def identities(self) -> Identities:
        """Certificates for test callers from the session OpenBao's PKI (set up once)."""
        if self._identities is None:
            self._identities = Identities(self.bao.addr, self.bao.token)
        return self._identities

    def nats_credentials(self, user: str = natsauth.OPERATOR) -> natsauth.Credentials:
        """A NATS user's credentials (a service's, or the operator's by default), its seed
        read from the session OpenBao as the service itself reads it."""
        client = self.bao.client()
        seed = natsauth.read_seed(client, natsauth.kv_path(user))
        assert seed is not None, f"no NATS seed for {user}"
        return natsauth.Credentials(user, seed, self.bao.ca_pem)

    def create_service_database(self, prefix: str) -> ServiceDatabase:
        """A fresh, empty database owned by the session's migration role, which a service
        migrates as (granting the session's runtime role what each table allows) and runs as
        the runtime role, as in the local stack and the chart."""
        name = f"{prefix}_{next(_db_counter)}_{os.getpid()}"
        with psycopg.connect(self.pg.conninfo("postgres"), autocommit=True) as db:
            db.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(self.migration.user)
                )
            )
        return ServiceDatabase(name, self.pg.port, self.migration, self.runtime)

    def create_kernel_database(self, prefix: str) -> str:
        """A fresh database with the kernel's tables only (events, streams, checkpoints,
        handled events), for a test's own service, which ships no migrations; returns the
        owning role's SQLAlchemy URL."""
        url = self.create_database(prefix)
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                kernel_metadata.create_all(conn)
        finally:
            engine.dispose()
        return url

    def create_database(self, prefix: str) -> str:
        """A fresh, empty database; returns the SQLAlchemy URL of the role that owns it (a
        dev setup: one role migrates and runs; never the superuser)."""
        return self.create_service_database(prefix).migration_url


_db_counter = itertools.count()


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    root = tmp_path_factory.mktemp("stack")
    logs = root / "logs"
    logs.mkdir()
    pg = Postgres(data_dir=root / "pg", port=free_port(), log_dir=logs, durable=False)
    nats = Nats(store_dir=root / "nats", port=free_port(), monitor_port=free_port(), log_dir=logs)
    bao = OpenBao(data_dir=root / "bao", port=free_port(2), log_dir=logs, dev=True)
    pg.start()
    bao.start()
    # The NATS users (one nkey per service, and the operator the tests use for synthetic
    # events) are issued into this OpenBao; nats-server gets their public keys only.
    nats.accounts = natsauth.provision(bao.client())
    nats.start()
    try:
        migration, runtime = pg.create_login("test_migration"), pg.create_login("test_runtime")
        yield Infra(pg, nats, bao, root, migration, runtime)
    finally:
        bao.stop()
        nats.stop()
        pg.stop()


@pytest.fixture
async def store(infra: Infra) -> AsyncIterator[EventStore]:
    """An event store on a fresh database, migrated."""
    s = EventStore(make_engine(infra.create_database("es")))
    await s.create_tables()
    yield s
    await s.engine.dispose()


@pytest.fixture
async def js(infra: Infra) -> AsyncIterator[JetStreamContext]:
    """JetStream on the session's NATS, as the test user, with the event streams made."""
    nc, js = await bus.connect(infra.nats.url, "test", infra.nats_credentials())
    await bus.ensure_streams(js)
    yield js
    await nc.close()


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**32)))
    print(f"TEST_SEED={seed}")
    return random.Random(seed)
