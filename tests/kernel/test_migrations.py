"""Schema migrations (services/kernel/schema.py, each service's Alembic revisions), on real
PostgreSQL.

- Every service's models match its revisions upgraded on an empty database (compare_metadata
  finds nothing): a model change without its revision fails here.
- A database the release before made (its tables from ``create_all``, no version table), with
  data in it, is stamped and upgraded: every event and every row is still there, the new columns
  hold what the events say, and the ledger serves and works on it.
- A database made by ``create_all`` of the last release without migrations is adopted too.
- A service refuses to start on a database behind its revisions, naming the command.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Column, MetaData, String, inspect, text
from sqlalchemy.exc import ProgrammingError

from services.audit.service import SPEC as AUDIT
from services.catalog.service import SPEC as CATALOG
from services.eligibility.service import SPEC as ELIGIBILITY
from services.kernel import app, natsauth, schema
from services.kernel.app import ServiceSpec, migrate_only
from services.kernel.contract.budget import pool_stream
from services.kernel.events import Context, new_envelope
from services.kernel.eventstore import EventStore, kernel_metadata, make_engine
from services.kernel.settings import Settings
from services.ledger.service import SPEC as LEDGER
from subsidy.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from subsidy.v1 import events_pb2 as ev
from subsidyctl.stack import Nats, free_port
from subsidyctl.stack.postgres import ServiceDatabase
from tests.conftest import Infra
from tests.support.callers import AUDITOR, CallerRouter

SPECS: tuple[ServiceSpec, ...] = (CATALOG, ELIGIBILITY, LEDGER, AUDIT)
POOL = "pool-2025"
LEDGER_ACTOR = common_pb2.Actor(kind=common_pb2.Actor.KIND_SERVICE, id="ledger")


def _schema(spec: ServiceSpec) -> schema.Schema:
    found = spec.schema
    assert found is not None, f"{spec.name} ships no migrations"
    return found


def _settings(database: ServiceDatabase, service: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "service": service,
        "grpc_listen": "127.0.0.1:0",
        "database_url": database.runtime_url,
        "migration_database_url": database.migration_url,
        "nats_url": "nats://127.0.0.1:1",
        "vault_addr": "http://127.0.0.1:1",
        "vault_token": "unused",
        "vault_k8s_role": None,
        "tls_source": "vault",
    }
    return Settings(**(values | kw))


@dataclass
class Engines:
    database: ServiceDatabase
    owner: EventStore
    runtime: EventStore

    async def dispose(self) -> None:
        await self.owner.engine.dispose()
        await self.runtime.engine.dispose()

    async def rows(self, query: str) -> list[tuple[Any, ...]]:
        async with self.owner.engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(text(query))]


@pytest.fixture
async def ledger_db(infra: Infra) -> AsyncIterator[Engines]:
    database = infra.create_service_database("migrate_ledger")
    engines = Engines(
        database,
        EventStore(make_engine(database.migration_url, pool_size=1)),
        EventStore(make_engine(database.runtime_url, pool_size=2)),
    )
    yield engines
    await engines.dispose()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_every_service_models_match_its_migrated_schema(
    infra: Infra, spec: ServiceSpec
) -> None:
    """The CI check: fails when a model changes without a revision (add one with
    ``subsidyctl schema revision SERVICE -m MESSAGE``)."""
    database = infra.create_service_database(f"models_{spec.name}")
    await migrate_only(spec, _settings(database, spec.name))
    owner = make_engine(database.migration_url, pool_size=1)
    runtime = make_engine(database.runtime_url, pool_size=1)
    try:
        assert await schema.differences(owner, _schema(spec)) == []
        # The runtime role reads the version (it checks it at start) and cannot change it.
        assert await schema.current(runtime, _schema(spec)) == (_schema(spec).head(),)
        await schema.require_current(runtime, _schema(spec))
        for statement in ("UPDATE alembic_version SET version_num = 'x'", "DROP TABLE events"):
            with pytest.raises(ProgrammingError) as err:
                async with runtime.begin() as conn:
                    await conn.execute(text(statement))
            assert isinstance(err.value.orig, psycopg.errors.InsufficientPrivilege)
    finally:
        await owner.dispose()
        await runtime.dispose()


async def test_a_model_without_its_revision_is_a_difference(infra: Infra) -> None:
    """The check above can fail: a column the models have and no revision adds is named."""
    database = infra.create_service_database("models_drift")
    await migrate_only(CATALOG, _settings(database, "catalog"))
    drifted = MetaData()
    for table in CATALOG.metadata.tables.values():
        copy = table.to_metadata(drifted)
        if table.name == "merchants":
            copy.append_column(Column("region_code", String(12), nullable=True))
    changed = schema.Schema("catalog", (kernel_metadata, drifted), _schema(CATALOG).package)
    owner = make_engine(database.migration_url, pool_size=1)
    try:
        found = await schema.differences(owner, changed)
    finally:
        await owner.dispose()
    assert [(d[0], d[2], d[3].name) for d in found] == [("add_column", "merchants", "region_code")]


async def test_a_service_refuses_a_database_behind_its_revisions(
    ledger_db: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(ledger_db.database, "ledger")
    with pytest.raises(schema.SchemaNotCurrent) as err:
        await app.start(LEDGER, settings)
    assert "no schema version" in str(err.value)
    assert "run `python -m services.ledger migrate` first" in str(err.value)
    await schema.upgrade(
        ledger_db.owner.engine,
        _schema(LEDGER),
        runtime_role=ledger_db.database.runtime.user,
        to=schema.BASELINE,
    )
    with pytest.raises(schema.SchemaNotCurrent) as err:
        await app.start(LEDGER, settings)
    head = _schema(LEDGER).head()
    assert int(head) >= 2
    assert str(err.value) == (
        f"ledger: the database is at revision 0001, this release needs {head}: "
        "run `python -m services.ledger migrate` first"
    )
    # A revision this release does not know is a newer release's: it starts, with a warning.
    async with ledger_db.owner.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    with caplog.at_level(logging.WARNING, logger="services.kernel.schema"):
        await schema.require_current(ledger_db.runtime.engine, _schema(LEDGER))
    assert f"newer than this release's {head}" in caplog.text


NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
# o-2 is unpaid and past its timeout; the others are not.
EXPIRES = {
    "o-1": NOW + dt.timedelta(minutes=15),
    "o-2": NOW - dt.timedelta(minutes=1),
    "o-3": NOW + dt.timedelta(minutes=15),
}


def _reserved(order: str, fen: int) -> ev.SubsidyReserved:
    expires_at = Timestamp()
    expires_at.FromDatetime(EXPIRES[order])
    return ev.SubsidyReserved(
        order_id=order,
        pool_id=POOL,
        platform_id="jd",
        consumer_id=f"c-{order}",
        qualification_id=f"q-{order}",
        sku="sku-fridge",
        merchant_id="m-1",
        category="refrigerator",
        unit_price_fen=fen * 5,
        subsidy_fen=fen,
        expires_at=expires_at,
    )


async def _old_release_data(store: EventStore) -> None:
    """What the release before wrote (its events carry no funding-source parts, paid amounts
    or tranches), with the read-model rows its projections kept: one pool of one source, an
    order captured, one cancelled and one still pending (past its timeout)."""
    ctx = Context(LEDGER_ACTOR, policy_version="2025.1")
    operator = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-li"))
    approver = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_APPROVER, id="ap-wang"))
    proposal = [
        new_envelope(
            "ledger",
            "funding/p-1",
            ev.FundingProposed(
                proposal_id="p-1",
                pool_id=POOL,
                amount_fen=1_000_000,
                source="district",
                idempotency_key="fund-1",
                platform_ids=["jd"],
            ),
            operator,
        ),
        new_envelope(
            "ledger",
            "funding/p-1",
            ev.FundingApproved(proposal_id="p-1", pool_id=POOL, amount_fen=1_000_000),
            approver,
        ),
    ]
    pool = [
        ev.BudgetFunded(
            pool_id=POOL, amount_fen=1_000_000, source="district", idempotency_key="fund-1"
        ),
        ev.PoolAssigned(pool_id=POOL, platform_id="jd"),
        _reserved("o-1", 50_000),
        ev.SubsidyCaptured(
            order_id="o-1",
            pool_id=POOL,
            subsidy_fen=50_000,
            payment_ref="pay-1",
            qualification_id="q-o-1",
        ),
        _reserved("o-2", 30_000),  # unpaid, past its timeout
        _reserved("o-3", 20_000),
        ev.SubsidyReleased(
            order_id="o-3",
            pool_id=POOL,
            subsidy_fen=20_000,
            reason="CANCELLED",
            qualification_id="q-o-3",
        ),
    ]
    await store.append("funding/p-1", 0, proposal)
    await store.append(
        pool_stream(POOL), 0, [new_envelope("ledger", pool_stream(POOL), e, ctx) for e in pool]
    )
    async with store.engine.begin() as conn:
        for statement in (
            "INSERT INTO budget_pools VALUES ('pool-2025', 1000000, 920000, 30000, 50000)",
            "INSERT INTO funding_keys VALUES ('fund-1', 'pool-2025', 1000000)",
            "INSERT INTO funding_proposals VALUES "
            "('p-1', 'pool-2025', 1000000, 'district', 'APPROVED', 'op-li', 'ap-wang', 'jd')",
            "INSERT INTO pool_platforms VALUES ('pool-2025', 'jd')",
            "INSERT INTO checkpoints VALUES ('relay', 7, 7)",
        ):
            await conn.execute(text(statement))
        for order, fen, status, reason, ref in (
            ("o-1", 50_000, "CAPTURED", "", "pay-1"),
            ("o-2", 30_000, "PENDING", "", ""),
            ("o-3", 20_000, "RELEASED", "CANCELLED", ""),
        ):
            await conn.execute(
                text(
                    "INSERT INTO reservations VALUES (:o, 'pool-2025', 'jd', :c, :q, "
                    "'sku-fridge', 'm-1', 'refrigerator', :price, :fen, '2025.1', :status, "
                    "CAST(:exp AS timestamptz), :reason, :ref, '')"
                ),
                {
                    "o": order,
                    "c": f"c-{order}",
                    "q": f"q-{order}",
                    "price": fen * 5,
                    "fen": fen,
                    "status": status,
                    "exp": EXPIRES[order],
                    "reason": reason,
                    "ref": ref,
                },
            )


EVENTS = "SELECT event_id, stream_id, stream_version, envelope FROM events ORDER BY position"
RESERVATIONS = (
    "SELECT order_id, status, subsidy_fen, release_reason, payment_ref, policy_version, "
    "expires_at FROM reservations ORDER BY order_id"
)
POOLS = "SELECT pool_id, funded_fen, available_fen, reserved_fen, spent_fen FROM budget_pools"


def _digest(rows: list[tuple[Any, ...]]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()


async def test_the_release_before_with_its_data_upgrades_intact_and_the_ledger_works_on_it(
    infra: Infra, ledger_db: Engines
) -> None:
    owner = ledger_db.owner
    # The release before: its create_all made exactly revision 0001's tables and no version.
    await schema.upgrade(owner.engine, _schema(LEDGER), to=schema.BASELINE)
    async with owner.engine.begin() as conn:
        await conn.execute(text("DROP TABLE alembic_version"))
    await _old_release_data(owner)
    events = await ledger_db.rows(EVENTS)
    reservations = await ledger_db.rows(RESERVATIONS)
    pools = await ledger_db.rows(POOLS)
    assert len(events) == 9 and len(reservations) == 3

    settings = _settings(ledger_db.database, "ledger")
    await migrate_only(LEDGER, settings)  # what the chart's Job runs: stamp 0001, apply the rest

    assert await schema.current(owner.engine, _schema(LEDGER)) == (_schema(LEDGER).head(),)
    assert await schema.differences(owner.engine, _schema(LEDGER)) == []
    # Every event byte for byte, every old row and column as it was.
    assert _digest(await ledger_db.rows(EVENTS)) == _digest(events)
    assert await ledger_db.rows(RESERVATIONS) == reservations
    assert await ledger_db.rows(POOLS) == pools
    assert await ledger_db.rows("SELECT * FROM checkpoints") == [("relay", 7, 7)]
    assert await ledger_db.rows("SELECT tranches FROM funding_proposals") == [([],)]
    # The new columns hold what the events say: each reservation's parts (attributed to the
    # pool's one source, as the fold does for events written before sources), the source's
    # figures, the category's use.
    assert await ledger_db.rows(
        "SELECT order_id, sources, paid_amount_fen, capture_flag FROM reservations "
        "ORDER BY order_id"
    ) == [
        ("o-1", [["district", 50_000]], None, ""),
        ("o-2", [["district", 30_000]], None, ""),
        ("o-3", [["district", 20_000]], None, ""),
    ]
    assert await ledger_db.rows(
        "SELECT source, funded_fen, available_fen, reserved_fen, spent_fen, scheduled_fen "
        "FROM budget_sources"
    ) == [("district", 1_000_000, 920_000, 30_000, 50_000, 0)]
    assert await ledger_db.rows(
        "SELECT category, reserved_fen, spent_fen FROM budget_categories"
    ) == [("refrigerator", 30_000, 50_000)]
    # Migrating again changes nothing.
    assert await schema.upgrade(owner.engine, _schema(LEDGER)) == []

    # The ledger starts on it (as its runtime role), expires the old unpaid order through its
    # own pipeline, and answers the budget with the source's figures.
    root = infra.root / f"migrate-nats-{free_port()}"
    root.mkdir()
    nats = Nats(
        store_dir=root / "nats",
        port=free_port(),
        monitor_port=free_port(),
        log_dir=root,
        accounts=natsauth.provision(infra.bao.client()),
    )
    nats.start()
    running = None
    try:
        running = await app.start(
            LEDGER,
            _settings(
                ledger_db.database,
                "ledger",
                nats_url=nats.url,
                vault_addr=infra.bao.addr,
                vault_token=infra.bao.token,
                peers={"catalog": "127.0.0.1:1", "eligibility": "127.0.0.1:1"},
            ),
        )
        for _ in range(200):
            if await ledger_db.rows("SELECT status FROM reservations WHERE order_id = 'o-2'") == [
                ("RELEASED",)
            ]:
                break
            await asyncio.sleep(0.05)
        assert await ledger_db.rows(
            "SELECT status, release_reason FROM reservations WHERE order_id = 'o-2'"
        ) == [("RELEASED", "EXPIRED")]
        channel = CallerRouter(f"127.0.0.1:{running.port}", infra.identities).as_caller(AUDITOR)
        try:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            budget = await stub.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=POOL), timeout=10)
        finally:
            await channel.close()
        assert (budget.funded_fen, budget.available_fen, budget.reserved_fen, budget.spent_fen) == (
            1_000_000,
            950_000,
            0,
            50_000,
        )
        assert [(s.source, s.available_fen, s.spent_fen) for s in budget.sources] == [
            ("district", 950_000, 50_000)
        ]
        assert len(await ledger_db.rows(EVENTS)) == 10  # the expiry, appended after the old log
    except grpc.aio.AioRpcError as err:  # pragma: no cover - the failure's own words
        raise AssertionError(err.details()) from err
    finally:
        if running is not None:
            await running.stop()
        nats.stop()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_a_database_create_all_made_before_migrations_is_adopted(
    infra: Infra, spec: ServiceSpec
) -> None:
    """The last release without migrations made every table with create_all (the ledger's
    new tables too, but not its new columns on old tables): migrate stamps and upgrades it."""
    database = infra.create_service_database(f"adopt_{spec.name}")
    owner = EventStore(make_engine(database.migration_url, pool_size=1))
    try:
        await owner.create_tables(spec.metadata)
        await owner.append(
            "s/1",
            0,
            [
                new_envelope(
                    spec.name,
                    "s/1",
                    ev.PoolAssigned(pool_id="p", platform_id="jd"),
                    Context(LEDGER_ACTOR),
                )
            ],
        )
        await migrate_only(spec, _settings(database, spec.name))
        assert await schema.current(owner.engine, _schema(spec)) == (_schema(spec).head(),)
        assert await schema.differences(owner.engine, _schema(spec)) == []
        assert await owner.count() == 1
    finally:
        await owner.engine.dispose()


REPO = Path(__file__).resolve().parents[2]


def _service_env(database: ServiceDatabase, **extra: str) -> dict[str, str]:
    """What `python -m services.<name>` reads; the URLs carry the passwords (a test)."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "SUBSIDY_GRPC_LISTEN": "127.0.0.1:0",
        "SUBSIDY_DATABASE_URL": database.runtime_url,
        "SUBSIDY_NATS_URL": "tls://127.0.0.1:1",
        "SUBSIDY_VAULT_ADDR": "http://127.0.0.1:1",
        "SUBSIDY_VAULT_TOKEN": "unused",
        "SUBSIDY_TLS_SOURCE": "vault",
        **extra,
    }


def test_the_installed_package_migrates_and_a_service_refuses_a_database_behind(
    infra: Infra, tmp_path: Path
) -> None:
    """From a wheel of the project, installed apart from the repository, with no alembic.ini:
    a service run on an empty database refuses to start and says what to run; `migrate`
    (the chart's Job) brings it to head; the models then match."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for package in ("services", "subsidyctl", "subsidy"):  # what the image's build copies
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    installed = tmp_path / "site"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
        names = set(archive.namelist())
    for spec in SPECS:
        assert f"services/{spec.name}/migrations/env.py" in names
        assert f"services/{spec.name}/migrations/script.py.mako" in names
    assert "services/ledger/migrations/versions/r0002_funding_sources.py" in names

    database = infra.create_service_database("packaged")
    env = _service_env(database, PYTHONPATH=str(installed))
    serve = subprocess.run(
        [sys.executable, "-m", "services.catalog"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 2, serve.stderr
    assert (
        "catalog: the database has no schema version (empty, or created before migrations); "
        "this release needs revision 0002: run `python -m services.catalog migrate` first"
    ) in serve.stderr
    migrate = subprocess.run(
        [sys.executable, "-m", "services.catalog", "migrate"],
        env=env | {"SUBSIDY_MIGRATION_DATABASE_URL": database.migration_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    check = subprocess.run(
        [sys.executable, "-c", "import services.kernel.schema as s; print(s.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip().startswith(str(installed))  # the installed copy ran

    async def verify() -> None:
        engine = make_engine(database.runtime_url, pool_size=1)
        try:
            await schema.require_current(engine, _schema(CATALOG))
            assert await schema.differences(engine, _schema(CATALOG)) == []
        finally:
            await engine.dispose()

    asyncio.run(verify())


def test_subsidyctl_schema_check_finds_the_models_and_revisions_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The developer's check (a throwaway PostgreSQL of its own), as CI's above."""
    from subsidyctl.cli import main

    assert main(["schema", "check", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"service": spec.name, "head": _schema(spec).head(), "differences": []}
        for spec in (CATALOG, ELIGIBILITY, LEDGER, AUDIT)
    ]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_every_revision_downgrades_and_upgrades_again(
    infra: Infra, spec: ServiceSpec
) -> None:
    """Down to nothing and up again leaves the schema the models declare (a revision's
    downgrade is what an operator would run by hand after a failed release)."""
    from alembic import command

    database = infra.create_service_database(f"down_{spec.name}")
    owner = make_engine(database.migration_url, pool_size=1)
    target = _schema(spec)
    try:
        await schema.upgrade(owner, target)
        async with owner.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(target.config(c), "base"))
            tables = await conn.run_sync(lambda c: sorted(inspect(c).get_table_names()))
        assert tables == ["alembic_version"]
        assert await schema.upgrade(owner, target) == [
            s.revision for s in reversed(list(target.script().walk_revisions()))
        ]
        assert await schema.differences(owner, target) == []
    finally:
        await owner.dispose()


async def test_audit_0004_fills_each_case_digest_from_its_opening_event(infra: Infra) -> None:
    """Cases opened before 0004 get the text digest their CaseOpened event recorded, so a
    complaint filed again under its id compares against it like a case opened after."""
    database = infra.create_service_database("migrate_audit_digest")
    owner = make_engine(database.migration_url, pool_size=1)
    target = _schema(AUDIT)
    digest = hashlib.sha256(b"no goods").hexdigest()
    opened = ev.CaseOpened(case_id="case-old", kind="COMPLAINT", text_sha256=digest)
    env = new_envelope("audit", "case/case-old", opened, Context(LEDGER_ACTOR), version=1)
    at = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    try:
        assert await schema.upgrade(owner, target, to="0003") == ["0001", "0002", "0003"]
        async with owner.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
                    "envelope) VALUES (:id, 'case/case-old', 1, 'subsidy.v1.CaseOpened', :e)"
                ),
                {"id": env.event_id, "e": env.SerializeToString()},
            )
            await conn.execute(
                text(
                    "INSERT INTO cases VALUES ('case-old', 'COMPLAINT', 'NORMAL', 'OPEN', 'jd', "
                    "'o-1', 'CONSUMER', :at, :at, :at, '', '', 8, false, '', '', '', 0, '', '', "
                    "false, false, '', 0)"
                ),
                {"at": at},
            )
        assert await schema.upgrade(owner, target) == ["0004"]
        async with owner.connect() as conn:
            found = await conn.scalar(text("SELECT text_sha256 FROM cases"))
        assert found == digest
    finally:
        await owner.dispose()
