"""At restore: every read model rebuilt by replay equals the restored one.

Each service's projections are replayed by their own code (``projections.rebuild``, the risk
read models' ``rebuild``, catalog's ``apply_event`` over its own tables) against an event store
whose transactions never commit: :class:`ReplayProbe` notes every table's rows when a rebuild's
transaction opens (the restored read model), again when its work is done (the replayed one),
compares the two as multisets and rolls back. The restored database is left exactly as
restored, and a difference is reported with its table and how many rows each side alone has.

Rows are compared by a SHA-256 of each row's values, so memory grows with the number of rows
(~100 bytes each), not their size. Catalog's ``sales_orders`` is fed by the ledger's events
through JetStream (catalog.sales.rebuild), which a restore does not archive; the ledger's
events it is built from are checked in the ledger's read models.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from services.audit.verify import Problem
from services.catalog import projections as catalog_projections
from services.eligibility import projections as eligibility_projections
from services.eligibility import risk_projections
from services.kernel.eventstore import EventStore, Tx
from services.ledger import projections as ledger_projections

if TYPE_CHECKING:
    from .backup import Database

RowDigests = dict[str, Counter[bytes]]
Rebuild = Callable[[EventStore], Awaitable[int]]


async def _rebuild_catalog(store: EventStore) -> int:
    """Catalog has no rebuild of its own: its own events through its own ``apply_event``, over
    every table they feed (all but the ledger-fed ``sales_orders`` and ``catalog_clock``, which
    no event feeds: VerifyItem's mark of the last change, moved by the rebuild's writes)."""
    fed_elsewhere = {catalog_projections.sales_orders.name, catalog_projections.catalog_clock.name}
    own = [t for t in catalog_projections.metadata.sorted_tables if t.name not in fed_elsewhere]
    return await store.rebuild(own, catalog_projections.apply_event)


async def _rebuild_eligibility(store: EventStore) -> int:
    return await eligibility_projections.rebuild(store) + await risk_projections.rebuild(store)


# The services whose read models a restore replays, and each one's own rebuild.
# Their metadata holds every table of the service (the risk, reconciliation and settlement
# tables join it when their modules are imported, as here).
REBUILDS: Mapping[str, tuple[Rebuild, MetaData]] = {
    "catalog": (_rebuild_catalog, catalog_projections.metadata),
    "eligibility": (_rebuild_eligibility, eligibility_projections.metadata),
    "ledger": (ledger_projections.rebuild, ledger_projections.metadata),
}


async def _digests(conn: AsyncConnection, tables: Iterable[Table]) -> RowDigests:
    found: RowDigests = {}
    for table in tables:
        rows = await conn.stream(select(table))
        found[table.name] = Counter(
            [hashlib.sha256(repr(tuple(row)).encode()).digest() async for row in rows]
        )
    return found


def compare(service: str, restored: RowDigests, replayed: RowDigests) -> list[Problem]:
    """A problem per table whose restored rows are not its replayed rows."""
    problems = []
    for name in sorted(restored):
        only_restored = restored[name] - replayed[name]
        only_replayed = replayed[name] - restored[name]
        if only_restored or only_replayed:
            problems.append(
                Problem(
                    "read_models",
                    f"{service}.{name}: the restored read model is not what replaying the "
                    f"events gives ({only_restored.total()} rows only restored, "
                    f"{only_replayed.total()} only replayed)",
                )
            )
    return problems


class ReplayProbe(EventStore):
    """An event store whose transactions compare the rows of ``tables`` at their start and end,
    then roll back (see the module's docstring)."""

    def __init__(self, service: str, url: URL, tables: Iterable[Table]) -> None:
        super().__init__(create_async_engine(url, pool_size=2))
        self.service = service
        self.tables = list(tables)
        self.problems: list[Problem] = []

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.engine.connect() as conn:
            trans = await conn.begin()
            try:
                restored = await _digests(conn, self.tables)
                yield Tx(conn, self)
                replayed = await _digests(conn, self.tables)
                self.problems += compare(self.service, restored, replayed)
            finally:
                await trans.rollback()


def async_url(db: Database) -> URL:
    """``db`` for SQLAlchemy's asyncio psycopg driver."""
    return URL.create(
        "postgresql+psycopg",
        username=db.user,
        password=db.password,
        host=db.host,
        port=db.port,
        database=db.database,
        query={"sslmode": db.sslmode} if db.sslmode else {},
    )


async def check_read_models(databases: Mapping[str, Database]) -> tuple[list[Problem], int]:
    """Replay each restored service's events through its projections and compare; returns the
    differences and how many events the projections applied."""
    problems: list[Problem] = []
    applied = 0
    for service, (rebuild, metadata) in REBUILDS.items():
        if service not in databases:
            continue
        probe = ReplayProbe(service, async_url(databases[service]), metadata.sorted_tables)
        try:
            applied += await rebuild(probe)
        except Exception as exc:  # an event its projections cannot apply: a difference too
            problems.append(Problem("read_models", f"{service}: the replay failed: {exc!r:.300}"))
        finally:
            await probe.engine.dispose()
        problems += probe.problems
    return problems, applied
