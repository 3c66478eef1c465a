"""The audit log's append, on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert, select, text

from services.audit import log
from services.audit.verify import replay
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

CTX = Context(service_actor("ledger"))


@pytest.fixture
async def audit_store(infra: Infra) -> AsyncIterator[EventStore]:
    s = EventStore(make_engine(infra.create_database("audit")))
    await s.create_tables(log.metadata)
    await log.ensure_head(s)
    yield s
    await s.engine.dispose()


def funded(fen: int, version: int = 1) -> ev.EventEnvelope:
    """A pool's funding event as the ledger's store would hold it (at that stream version)."""
    return new_envelope(
        "ledger",
        "budget-pool/p",
        ev.BudgetFunded(pool_id="p", amount_fen=fen),
        CTX,
        version=version,
    )


async def consume(store: EventStore, env: ev.EventEnvelope) -> None:
    """What the audit consumer does with one event: mark it handled and append, together."""
    async with store.transaction() as tx:
        if await tx.mark_handled("audit-log", env.event_id):
            await log.append(tx, env)


async def handled(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM handled_events")) or 0)


async def test_without_its_head_row_the_log_refuses_to_append_and_nothing_is_handled(
    audit_store: EventStore,
) -> None:
    await consume(audit_store, funded(1))
    async with audit_store.engine.begin() as conn:
        saved = (await conn.execute(select(log.head))).one()
        await conn.execute(log.head.delete())  # e.g. a partial restore
    lost = funded(2, version=2)
    with pytest.raises(log.AuditHeadMissing):
        await consume(audit_store, lost)
    assert await handled(audit_store) == 1  # the event stays unhandled: it will be retried
    assert (await log.info(audit_store))[2] == {"ledger": 1}
    # With the head restored, the retry appends it, chained after the first entry.
    async with audit_store.engine.begin() as conn:
        await conn.execute(insert(log.head).values(**saved._mapping))
    await consume(audit_store, lost)
    rows = await log.read(audit_store, 0, 10)
    assert [r[0] for r in rows] == [0, 1]
    assert replay(rows).head == (await log.info(audit_store))[1]
    assert await handled(audit_store) == 2
