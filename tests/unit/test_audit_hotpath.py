"""The audit service's ingestion path in round trips, on a real PostgreSQL: what the checkout's
profile (issue 14) took off it must stay off, and the refusals its statements keep.

Statements are counted from libpq's own trace of each connection the store checks out (every
``Query`` and ``Bind`` message the client sends is one statement PostgreSQL runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError

from services.audit import cases, log, tree
from services.audit.verify import replay
from services.kernel import vault
from services.kernel.contract import merkle
from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, make_engine
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra


@pytest.fixture
async def audit_store(infra: Infra) -> AsyncIterator[EventStore]:
    s = EventStore(make_engine(infra.create_database("audit")))
    await s.create_tables(log.metadata)
    await log.ensure_head(s)
    await tree.ensure_tree(s)
    yield s
    await s.engine.dispose()


async def append(store: EventStore, n: int, start: int = 0) -> list[bytes]:
    """Append ``n`` ledger events as the consumer does; their envelope bytes."""
    out = []
    for i in range(start, start + n):
        env = new_envelope(
            "ledger",
            f"reservation/o-{i}",
            ev.SubsidyCaptured(order_id=f"o-{i}", pool_id="p", subsidy_fen=i),
            Context(service_actor("ledger"), correlation_id=f"o-{i}"),
            version=1,
        )
        async with store.transaction() as tx:
            await log.append(tx, env)
        out.append(env.SerializeToString(deterministic=True))
    return out


@contextmanager
def statements(store: EventStore, trace: Path) -> Iterator[list[int]]:
    """Count the statements the store's connections send inside the block (the count is in
    the list's one item after it)."""
    counted = [0]
    traced: list[Any] = []
    out = trace.open("w")

    def on_checkout(dbapi_conn: Any, *_: Any) -> None:
        pgconn = dbapi_conn.driver_connection.pgconn
        pgconn.trace(out.fileno())
        traced.append(pgconn)

    event.listen(store.engine.sync_engine, "checkout", on_checkout)
    try:
        yield counted
    finally:
        event.remove(store.engine.sync_engine, "checkout", on_checkout)
        for pgconn in traced:
            pgconn.untrace()
        out.close()
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    counted[0] = sum(1 for f in sent if len(f) > 2 and f[1] == "F" and f[3] in ("Query", "Bind"))


async def test_an_integration_runs_the_same_few_statements_whatever_its_size(
    audit_store: EventStore, tmp_path: Path
) -> None:
    data = await append(audit_store, 40)
    await tree.integrate(audit_store, batch=1)  # every statement prepared on this connection
    with statements(audit_store, tmp_path / "small.trace") as small:
        assert await tree.integrate(audit_store, batch=3) == 3
    with statements(audit_store, tmp_path / "large.trace") as large:
        assert await tree.integrate(audit_store, batch=36) == 36
    # BEGIN, the sizes, the entries, the right edge's nodes, one write of nodes, keys and
    # size, COMMIT: no statement per entry, per node or per key.
    assert small[0] == large[0] == 6
    async with audit_store.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(tree.nodes)) == 2 * 40 - 2
        assert await tree.root_at(conn, 40) == merkle.root_of(map(merkle.leaf_hash, data))
    assert await tree.indexes_naming(audit_store, "o-39", 10) == [39]
    # Nothing new: one locked read of the sizes, no write.
    with statements(audit_store, tmp_path / "idle.trace") as idle:
        assert await tree.integrate(audit_store) == 0
    assert idle[0] == 3


async def test_a_node_of_the_right_edge_gone_refuses_the_integration(
    audit_store: EventStore,
) -> None:
    await append(audit_store, 6)
    assert await tree.integrate(audit_store) == 6
    await append(audit_store, 2, start=6)
    async with audit_store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_tree_nodes WHERE level = 2 AND idx = 0"))
    with pytest.raises(tree.TreeCorrupt, match=r"the tree is missing its nodes \[\(2, 0\)\]"):
        await tree.integrate(audit_store)
    assert await tree.current_size(audit_store) == 6  # nothing of the batch integrated
    async with audit_store.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(tree.named)) == 6


async def test_without_the_tree_row_nothing_is_integrated(audit_store: EventStore) -> None:
    await append(audit_store, 2)
    async with audit_store.engine.begin() as conn:
        await conn.execute(tree.tree.delete())
    with pytest.raises(tree.TreeCorrupt, match="audit_tree row 1 is missing"):
        await tree.integrate(audit_store)
    async with audit_store.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(tree.nodes)) == 0


async def test_an_order_reserved_twice_is_kept_once_with_its_first_platform(
    audit_store: EventStore, infra: Infra
) -> None:
    supervision = cases.Cases(audit_store, vault.connect(infra.bao.addr, token=infra.bao.token))
    for platform in ("plat-a", "plat-b"):
        env = new_envelope(
            "ledger",
            "reservation/o-1",
            ev.SubsidyReserved(order_id="o-1", platform_id=platform, pool_id="p"),
            Context(service_actor("ledger"), correlation_id="o-1"),
            version=1,
        )
        async with audit_store.transaction() as tx:
            await supervision.on_event(tx, env)
    async with audit_store.engine.connect() as conn:
        rows = (await conn.execute(select(cases.case_orders))).all()
    assert [tuple(r) for r in rows] == [("o-1", "plat-a")]


def captured(i: int) -> ev.EventEnvelope:
    return new_envelope(
        "ledger",
        f"reservation/o-{i}",
        ev.SubsidyCaptured(order_id=f"o-{i}", pool_id="p", subsidy_fen=i),
        Context(service_actor("ledger"), correlation_id=f"o-{i}"),
        version=1,
    )


async def test_a_batch_appended_in_one_statement_is_the_log_appended_one_by_one(
    audit_store: EventStore, infra: Infra, tmp_path: Path
) -> None:
    envs = [captured(i) for i in range(9)]
    one_by_one = EventStore(make_engine(infra.create_database("audit")))
    await one_by_one.create_tables(log.metadata)
    await log.ensure_head(one_by_one)
    try:
        for env in envs:
            async with one_by_one.transaction() as tx:
                await log.append(tx, env)
        async with audit_store.transaction() as tx:
            await log.append(tx, envs[0])
        with statements(audit_store, tmp_path / "batch.trace") as sent:
            async with audit_store.transaction() as tx:
                await log.append_all(tx, envs[1:5])
        assert sent[0] == 3  # BEGIN, the batch, COMMIT
        async with audit_store.transaction() as tx:
            await log.append_all(tx, envs[5:])
            await log.append_all(tx, [])
        assert await log.read(audit_store, 0, 20) == await log.read(one_by_one, 0, 20)
        assert await log.info(audit_store) == await log.info(one_by_one)
        rows = await log.read(audit_store, 0, 20)
        assert replay(rows).head == (await log.info(audit_store))[1]
    finally:
        await one_by_one.engine.dispose()


async def test_a_batch_without_the_head_row_appends_nothing(audit_store: EventStore) -> None:
    async with audit_store.transaction() as tx:
        await log.append(tx, captured(0))
    async with audit_store.engine.begin() as conn:
        await conn.execute(log.head.delete())
    with pytest.raises(log.AuditHeadMissing, match="2 events from"):
        async with audit_store.transaction() as tx:
            await log.append_all(tx, [captured(1), captured(2)])
    assert [r[0] for r in await log.read(audit_store, 0, 10)] == [0]


async def test_a_batch_with_an_event_already_in_the_log_appends_nothing(
    audit_store: EventStore,
) -> None:
    first = captured(0)
    async with audit_store.transaction() as tx:
        await log.append(tx, first)
    with pytest.raises(IntegrityError):
        async with audit_store.transaction() as tx:
            await log.append_all(tx, [captured(1), first])
    assert [r[0] for r in await log.read(audit_store, 0, 10)] == [0]
    assert (await log.info(audit_store))[0] == 1


async def test_concurrent_batches_and_single_appends_make_one_unbroken_chain(
    audit_store: EventStore,
) -> None:
    async def batches(first: int) -> None:
        for n in range(first, first + 30, 3):
            async with audit_store.transaction() as tx:
                await log.append_all(tx, [captured(n), captured(n + 1), captured(n + 2)])

    async def singles(first: int) -> None:
        for n in range(first, first + 30):
            async with audit_store.transaction() as tx:
                await log.append(tx, captured(n))

    await asyncio.gather(batches(0), batches(100), singles(200), batches(300), singles(400))
    rows = await log.read(audit_store, 0, 500)
    assert [r[0] for r in rows] == list(range(150))
    size, head, _ = await log.info(audit_store)
    assert size == 150 and replay(rows).head == head
