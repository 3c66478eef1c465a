"""The read horizon is per database: one service's long transaction holds back only its own
relay, never another service's on the same PostgreSQL server (transaction ids, and
pg_snapshot_xmin, are cluster-wide)."""

from __future__ import annotations

import asyncio

import psycopg

from services.kernel import bus
from services.kernel.eventstore import START, EventStore, make_engine
from tests.conftest import Infra
from tests.kernel.test_bus import funded, published_ids


async def test_a_long_transaction_in_catalogs_database_does_not_delay_ledgers_relay(
    infra: Infra,
) -> None:
    catalog_db = infra.create_service_database("horizon_catalog")
    ledger = EventStore(make_engine(infra.create_database("horizon_ledger")))
    await ledger.create_tables()
    nc, js = await bus.connect(infra.nats.url, "test", infra.nats_credentials())
    await bus.ensure_streams(js)
    # A writing transaction left open in catalog's database, as another role: it holds an xid
    # older than ledger's next append.
    with psycopg.connect(infra.pg.conninfo(catalog_db.name, infra.runtime)) as catalog:
        xid = catalog.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert xid is not None
        try:
            service = "horizonledger"
            env = funded(service, "p1", 100)
            await ledger.append("budget-pool/p1", 0, [env])
            # Not held back: ledger's reader and relay see the event while catalog's is open.
            assert [r.envelope.event_id for r in await ledger.read_all(START)] == [env.event_id]
            relay = bus.OutboxRelay(ledger, js)
            assert await asyncio.wait_for(relay.publish_pending(), 5) == 1
            assert await published_ids(js, service) == [env.event_id]
            still_open = catalog.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert still_open == xid  # the same transaction the whole time
        finally:
            catalog.rollback()
            await nc.close()
            await ledger.engine.dispose()


async def test_a_long_transaction_in_the_same_database_still_holds_its_reader(
    store: EventStore,
) -> None:
    """The horizon did not get looser for the database's own writers: an open transaction with
    an older id (which may still append) holds back everything after it."""
    url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as other:
        other.execute("SELECT pg_current_xact_id()")  # an older xid, still running
        await store.append("budget-pool/late", 0, [funded("test", "late", 1)])
        assert await store.read_all(START) == []
        other.rollback()
    assert len(await store.read_all(START)) == 1
