"""The services' schema revisions, for developers: ``subsidyctl schema revision|check``.

  subsidyctl schema revision SERVICE -m MESSAGE   write the next revision of SERVICE
  subsidyctl schema check                         every service's models against its revisions

Both start a throwaway PostgreSQL (the local stack's, in a temporary folder, stopped after),
upgrade a fresh database per service to head with the committed revisions and compare it with
the models (services/kernel/schema.py). ``revision`` writes what the models have and the
revisions lack into ``services/<service>/migrations/versions/r<NNNN>_<message>.py``, numbered
after the head; read it, make it expand-then-contract (docs/operations.md, "Adding a
revision"), and commit it with the model change. ``check`` prints one JSON object per service
(``differences`` empty when they agree) and exits 1 if any differs: what CI's
tests/kernel/test_migrations.py requires. Production databases are migrated by
``python -m services.<service> migrate`` (the chart's migration Job), never by this.
"""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from services.kernel import topology

from .common import EXIT_NO, EXIT_OK, Failure, JsonOpt, emit, note
from .stack import PANEL

if TYPE_CHECKING:  # Alembic, SQLAlchemy and psycopg load only when a schema command runs
    from services.kernel import schema as kernel_schema
    from subsidyctl.stack import Postgres

app = typer.Typer(
    name="schema",
    help="Schema revisions (Alembic) of the services' databases, for developers.",
    no_args_is_help=True,
)


def service_schema(service: str) -> kernel_schema.Schema:
    """The schema of one of the four services."""
    from services.kernel import schema as kernel_schema

    if service not in topology.SERVICE_NAMES:
        raise Failure(f"unknown service {service!r}: one of {', '.join(topology.SERVICE_NAMES)}")
    spec = importlib.import_module(f"services.{service}.service").SPEC
    found = spec.schema
    if found is None:
        raise Failure(f"{service} ships no schema revisions")
    assert isinstance(found, kernel_schema.Schema)
    return found


@contextmanager
def scratch_postgres() -> Iterator[Postgres]:
    """A PostgreSQL of its own in a temporary folder, stopped and removed after."""
    from subsidyctl.stack import Postgres, free_port

    with tempfile.TemporaryDirectory(prefix="subsidy-schema-") as tmp:
        pg = Postgres(data_dir=Path(tmp) / "pg", port=free_port(), log_dir=Path(tmp), durable=False)
        with pg:
            yield pg


async def _at_head(pg: Postgres, service: str) -> str:
    """A fresh database named after ``service``, upgraded to head; its URL."""
    from services.kernel import schema as kernel_schema
    from services.kernel.eventstore import make_engine

    pg.create_databases([service])
    url = pg.url(service)
    engine = make_engine(url, pool_size=1)
    try:
        await kernel_schema.upgrade(engine, service_schema(service))
    finally:
        await engine.dispose()
    return url


async def _differences(pg: Postgres, service: str) -> list[str]:
    from services.kernel import schema as kernel_schema
    from services.kernel.eventstore import make_engine

    url = await _at_head(pg, service)
    engine = make_engine(url, pool_size=1)
    try:
        return [repr(d) for d in await kernel_schema.differences(engine, service_schema(service))]
    finally:
        await engine.dispose()


@app.command(rich_help_panel=PANEL)
def revision(
    service: Annotated[str, typer.Argument(help="catalog, eligibility, ledger or audit")],
    message: Annotated[str, typer.Option("-m", "--message", help="what the revision does")],
    json_only: JsonOpt = False,
) -> int:
    """Write the next revision of SERVICE from what its models have and its revisions lack."""
    from sqlalchemy import create_engine

    from services.kernel import schema as kernel_schema

    target = service_schema(service)
    with scratch_postgres() as pg:
        url = asyncio.run(_at_head(pg, service))
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                path = kernel_schema.write_revision(conn, target, message)
        finally:
            engine.dispose()
    emit({"service": service, "revision": target.head(), "path": path})
    if not json_only:
        note(f"read {path}, make it expand-then-contract, and commit it with the model change")
    return EXIT_OK


@app.command(rich_help_panel=PANEL)
def check(json_only: JsonOpt = False) -> int:
    """Compare every service's models with its revisions upgraded on an empty database."""
    differ = False
    with scratch_postgres() as pg:
        for service in topology.SERVICE_NAMES:
            found = asyncio.run(_differences(pg, service))
            differ = differ or bool(found)
            emit({"service": service, "head": service_schema(service).head(), "differences": found})
    if differ and not json_only:
        note("a model changed without its revision: subsidyctl schema revision SERVICE -m ...")
    return EXIT_NO if differ else EXIT_OK
