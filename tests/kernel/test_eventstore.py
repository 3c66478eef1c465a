"""The event store's guarantees, on a real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import event, text

from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import (
    START,
    EventStore,
    Position,
    WrongExpectedVersion,
    make_engine,
)
from subsidy.v1 import events_pb2 as ev
from tests.conftest import Infra

CTX = Context(service_actor("test"))


def funded(pool: str, fen: int) -> ev.EventEnvelope:
    return new_envelope(
        "ledger", f"budget-pool/{pool}", ev.BudgetFunded(pool_id=pool, amount_fen=fen), CTX
    )


async def test_append_and_read_stream(store: EventStore) -> None:
    v = await store.append("budget-pool/a", 0, [funded("a", 1), funded("a", 2)])
    assert v == 2
    v = await store.append("budget-pool/a", 2, [funded("a", 3)])
    assert v == 3
    events = await store.read_stream("budget-pool/a")
    assert [e.stream_version for e in events] == [1, 2, 3]
    amounts = [ev.BudgetFunded.FromString(e.payload).amount_fen for e in events]
    assert amounts == [1, 2, 3]
    assert [e.stream_version for e in await store.read_stream("budget-pool/a", 3)] == [3]


async def test_wrong_expected_version_raises_and_writes_nothing(store: EventStore) -> None:
    await store.append("s/1", 0, [funded("x", 1)])
    with pytest.raises(WrongExpectedVersion) as err:
        await store.append("s/1", 0, [funded("x", 2), funded("x", 3)])
    assert (err.value.expected, err.value.actual) == (0, 1)
    with pytest.raises(WrongExpectedVersion):
        await store.append("s/1", 5, [funded("x", 2)])
    assert len(await store.read_stream("s/1")) == 1
    assert await store.count() == 1


async def test_concurrent_creators_of_one_stream_exactly_one_wins(store: EventStore) -> None:
    results = await asyncio.gather(
        *(store.append("s/race", 0, [funded("r", i)]) for i in range(10)), return_exceptions=True
    )
    wins = [r for r in results if r == 1]
    losses = [r for r in results if isinstance(r, WrongExpectedVersion)]
    assert len(wins) == 1 and len(losses) == 9
    assert len(await store.read_stream("s/race")) == 1


async def test_reader_never_overtakes_a_late_commit(store: EventStore) -> None:
    """Writer A takes a position first but commits after writer B: a reader must not skip A."""
    await store.append("s/before", 0, [funded("b", 1)])
    first = await store.read_all(START)
    assert len(first) == 1
    checkpoint = first[-1].position

    async with store.transaction() as tx_a:
        await tx_a.append("s/a", 0, [funded("a", 1)])  # holds an earlier position, uncommitted
        await store.append("s/b", 0, [funded("b", 2)])  # commits first
        # B is committed, but A is still running: the reader must wait, not skip ahead.
        assert await store.read_all(checkpoint) == []
    after = await store.read_all(checkpoint)
    assert [r.envelope.stream_id for r in after] == ["s/a", "s/b"]


async def test_concurrent_writers_and_a_poller_see_every_event_once(store: EventStore) -> None:
    """Many writers with interleaved commits; a poller that checkpoints sees each event once."""
    writers, per_writer = 8, 25
    seen: list[str] = []
    done = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(per_writer):
            async with store.transaction() as tx:
                await tx.append(f"s/w{w}-{i}", 0, [funded(f"w{w}", i + 1)])
                await asyncio.sleep(0.001 * ((w * 7 + i) % 3))  # commits land out of order

    async def poller() -> None:
        pos: Position = START
        while True:
            finished = done.is_set()
            batch = await store.read_all(pos, limit=7)
            for rec in batch:
                assert rec.position > pos
                seen.append(rec.envelope.event_id)
                pos = rec.position
            if finished and not batch:
                return
            await asyncio.sleep(0)

    poll = asyncio.create_task(poller())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await poll
    assert len(seen) == writers * per_writer
    assert len(set(seen)) == len(seen)


async def test_checkpoints_round_trip(store: EventStore) -> None:
    assert await store.load_checkpoint("relay") == START
    await store.save_checkpoint("relay", Position(10, 3))
    await store.save_checkpoint("relay", Position(12, 4))
    assert await store.load_checkpoint("relay") == Position(12, 4)


async def test_mark_handled_is_once_per_consumer(store: EventStore) -> None:
    async with store.transaction() as tx:
        assert await tx.mark_handled("audit", "e1") is True
        assert await tx.mark_handled("audit", "e1") is False
        assert await tx.mark_handled("eligibility", "e1") is True


async def test_mark_handled_many_is_once_per_consumer_in_one_statement(store: EventStore) -> None:
    async with store.transaction() as tx:
        assert await tx.mark_handled("audit", "e1") is True
        assert await tx.mark_handled_many("audit", ["e2", "e1", "e3", "e2"]) == {"e2", "e3"}
        assert await tx.mark_handled_many("audit", ["e1", "e2", "e3"]) == set()
        assert await tx.mark_handled_many("audit", []) == set()
        assert await tx.mark_handled("audit", "e3") is False
        assert await tx.mark_handled_many("eligibility", ["e1", "e3"]) == {"e1", "e3"}
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            assert await tx.mark_handled_many("audit", ["e4"]) == {"e4"}
            raise RuntimeError("rolled back")
    async with store.transaction() as tx:  # rolled back with its transaction
        assert await tx.mark_handled_many("audit", ["e4", "e1"]) == {"e4"}


async def test_first_writers_of_a_new_stream_queue_on_its_lock(store: EventStore) -> None:
    """lock_stream on a stream with no row used to lock nothing: concurrent first writers all
    read version 0 and all but one failed (surfacing as INTERNAL from FundBudget)."""

    async def first_writer(i: int) -> int:
        async with store.transaction() as tx:
            version = await tx.lock_stream("budget-pool/new")
            await asyncio.sleep(0.05)  # every writer has locked before any commits
            return await tx.append("budget-pool/new", version, [funded("new", i + 1)])

    versions = await asyncio.gather(*(first_writer(i) for i in range(8)))
    assert sorted(versions) == list(range(1, 9))
    events = await store.read_stream("budget-pool/new")
    assert [e.stream_version for e in events] == list(range(1, 9))


async def test_locking_a_new_stream_leaves_no_row_unless_something_is_appended(
    store: EventStore,
) -> None:
    """A stream exists iff it has a row in ``streams`` (callers rely on it): the version-0 row
    that locks a new stream is seen by no other transaction and does not outlive its own."""

    async def row_of(stream: str) -> int | None:
        async with store.engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT version FROM streams WHERE stream_id = :s"), {"s": stream}
            )
            return None if found is None else int(found)

    async with store.transaction() as tx:
        assert await tx.lock_stream("s/looked-at") == 0
        assert await row_of("s/looked-at") is None  # invisible outside the transaction
        await tx.mark_handled("c", "e")  # the transaction commits other writes
    assert await row_of("s/looked-at") is None
    assert await store.read_stream("s/looked-at") == []
    async with store.transaction() as tx:
        assert await tx.lock_stream("s/looked-at") == 0
        await tx.append("s/looked-at", 0, [funded("l", 1)])
    assert await row_of("s/looked-at") == 1
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.lock_stream("s/rolled-back")
            raise RuntimeError("rolled back")
    assert await row_of("s/rolled-back") is None


async def test_lock_streams_and_append_many_write_many_streams_at_once(store: EventStore) -> None:
    """The bulk forms of lock_stream and append (the importer's): new and existing streams
    locked together, each appended to at its own version, and a wrong expected version
    refused with nothing written to any stream."""

    async def versions() -> dict[str, int]:
        async with store.engine.connect() as conn:
            rows = await conn.execute(text("SELECT stream_id, version FROM streams"))
            return {r.stream_id: int(r.version) for r in rows}

    await store.append("s/old", 0, [funded("o", 1), funded("o", 2)])
    async with store.transaction() as tx:
        locked = await tx.lock_streams(["s/new-b", "s/old", "s/new-a", "s/unused"])
        assert locked == {"s/new-a": 0, "s/new-b": 0, "s/old": 2, "s/unused": 0}
        await tx.append_many(
            [
                ("s/new-a", 0, [funded("a", 1)]),
                ("s/old", 2, [funded("o", 3), funded("o", 4)]),
                ("s/new-b", 0, [funded("b", 1)]),
                ("s/unused", 0, []),
            ]
        )
    # A stream locked but given no event leaves no row, as with lock_stream.
    assert await versions() == {"s/new-a": 1, "s/new-b": 1, "s/old": 4}
    assert [e.stream_version for e in await store.read_stream("s/old")] == [1, 2, 3, 4]
    (a,) = await store.read_stream("s/new-a")
    assert (a.stream_id, a.stream_version) == ("s/new-a", 1)
    assert await store.count() == 6

    async with store.transaction() as tx:
        assert await tx.lock_streams(["s/old", "s/new-a", "s/fresh"]) == {
            "s/old": 4,
            "s/new-a": 1,
            "s/fresh": 0,
        }
        with pytest.raises(WrongExpectedVersion) as err:
            await tx.append_many(
                [
                    ("s/fresh", 0, [funded("f", 1)]),
                    ("s/new-a", 1, [funded("a", 2)]),
                    ("s/old", 3, [funded("o", 5)]),  # stale: the stream is at 4
                ]
            )
        assert (err.value.stream_id, err.value.expected, err.value.actual) == ("s/old", 3, 4)
        # Refused whole, even inside the still-open transaction: no stream moved, no event.
        assert await tx.lock_streams(["s/old", "s/new-a", "s/fresh"]) == {
            "s/old": 4,
            "s/new-a": 1,
            "s/fresh": 0,
        }
        await tx.mark_handled("c", "e")  # the transaction commits other writes
    assert await versions() == {"s/new-a": 1, "s/new-b": 1, "s/old": 4}
    assert await store.count() == 6


async def test_a_pooled_connection_keeps_its_prepared_statements_through_a_rollback(
    infra: Infra,
) -> None:
    """SQLAlchemy ends a read-only use of a pooled connection with a rollback, and psycopg would
    forget (DEALLOCATE ALL) every statement prepared on it then: the hot path's would be parsed
    and planned again after each. They are kept; a DEALLOCATE ALL still makes psycopg forget."""
    store = EventStore(make_engine(infra.create_database("prepkept"), pool_size=1))
    await store.create_tables()

    async def prepared() -> tuple[int, list[str]]:
        async with store.engine.connect() as conn:  # read-only: ended with a rollback
            pid = int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)
            names = await conn.scalars(text("SELECT statement FROM pg_prepared_statements"))
            return pid, [n for n in names if "INSERT INTO checkpoints" in n]

    try:
        await store.save_checkpoint("relay", Position(1, 1))  # prepared on the one connection
        pid, before = await prepared()
        assert len(before) == 1
        assert await prepared() == (pid, before)  # the same session, after that rollback
        await store.save_checkpoint("relay", Position(2, 2))
        assert await prepared() == (pid, before)  # run as prepared, not prepared again
        async with store.engine.connect() as conn:
            await conn.execute(text("DEALLOCATE ALL"))
        await store.save_checkpoint("relay", Position(3, 3))  # prepared again, no error
        assert await store.load_checkpoint("relay") == Position(3, 3)
        assert await prepared() == (pid, before)
    finally:
        await store.engine.dispose()


async def test_a_connection_opened_for_a_peak_stays_in_the_pool(infra: Infra) -> None:
    """make_engine keeps every connection it opens (up to its cap of 2 x pool_size): a second
    peak as wide as the first opens none, where overflow connections used to be closed as
    they came back and opened again (each a new login and a new backend)."""
    engine = make_engine(infra.create_database("es"), pool_size=2)
    opened: list[object] = []
    event.listen(engine.sync_engine, "connect", lambda conn, _record: opened.append(conn))
    held = asyncio.Event()

    async def use(ready: asyncio.Event) -> int:
        async with engine.connect() as conn:
            ready.set()
            await held.wait()
            return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)

    try:
        backends: list[set[int]] = []
        for _ in range(2):  # two peaks of 4 calls at once: the cap
            held.clear()
            ready = [asyncio.Event() for _ in range(4)]
            calls = [asyncio.create_task(use(r)) for r in ready]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
            held.set()
            backends.append(set(await asyncio.gather(*calls)))
        assert len(opened) == 4
        assert backends[1] == backends[0]  # the same four sessions served the second peak
    finally:
        await engine.dispose()
