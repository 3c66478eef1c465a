"""EventStore.append's group commit, on a real PostgreSQL: concurrent appends share a batch (one
statement, one transaction), and each is still all or nothing on its own, its failure seen by
its own caller only."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from services.kernel.events import Context, new_envelope, service_actor
from services.kernel.eventstore import EventStore, WrongExpectedVersion
from subsidy.v1 import events_pb2 as ev

CTX = Context(service_actor("test"))


def funded(pool: str, fen: int) -> ev.EventEnvelope:
    return new_envelope(
        "ledger", f"budget-pool/{pool}", ev.BudgetFunded(pool_id=pool, amount_fen=fen), CTX
    )


async def transactions(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(DISTINCT tx_id) FROM events")) or 0)


async def test_concurrent_appends_to_new_streams_share_one_transaction(store: EventStore) -> None:
    versions = await asyncio.gather(
        *(store.append(f"s/{i}", 0, [funded(str(i), 1), funded(str(i), 2)]) for i in range(40))
    )
    assert versions == [2] * 40
    assert await store.count() == 80
    # Submitted in one turn of the loop: one batch, so one transaction wrote every row.
    assert store._appends.stats.largest == 40
    assert await transactions(store) == 1
    for i in (0, 39):
        assert [e.stream_version for e in await store.read_stream(f"s/{i}")] == [1, 2]
    positions = [r.position for r in await store.read_all()]
    assert positions == sorted(positions)  # a stream's events in their version order


async def test_a_conflict_in_a_batch_fails_its_caller_only(store: EventStore) -> None:
    await store.append("s/old", 0, [funded("old", 1)])
    results = await asyncio.gather(
        store.append("s/new-a", 0, [funded("a", 1)]),
        store.append("s/old", 0, [funded("old", 2), funded("old", 3)]),  # it is at 1
        store.append("s/old-later", 3, [funded("l", 1)]),  # no such stream: not at 3
        store.append("s/new-b", 0, [funded("b", 1)]),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[3] == 1
    assert isinstance(results[1], WrongExpectedVersion)
    assert (results[1].stream_id, results[1].expected, results[1].actual) == ("s/old", 0, 1)
    assert isinstance(results[2], WrongExpectedVersion)
    assert (results[2].expected, results[2].actual) == (3, 0)
    assert [e.stream_version for e in await store.read_stream("s/old")] == [1]
    assert await store.read_stream("s/old-later") == []
    assert await store.count() == 3
    async with store.engine.connect() as conn:  # no stream row for the refused new stream
        rows = await conn.execute(text("SELECT stream_id, version FROM streams ORDER BY 1"))
        assert [tuple(r) for r in rows] == [("s/new-a", 1), ("s/new-b", 1), ("s/old", 1)]


async def test_a_statement_error_in_a_batch_reaches_its_own_caller_only(
    store: EventStore,
) -> None:
    first, copy = funded("x", 1), funded("y", 1)
    copy.event_id = first.event_id  # the same event id twice: the events key refuses one
    results = await asyncio.gather(
        store.append("s/x", 0, [first]),
        store.append("s/y", 0, [copy]),
        store.append("s/z", 0, [funded("z", 1)]),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], IntegrityError)  # as SQLAlchemy raised it before
    assert await store.read_stream("s/y") == []
    assert await store.count() == 2


async def test_appends_to_one_stream_are_never_in_one_batch(store: EventStore) -> None:
    """Five writers append to one stream at its current version each: they take turns in
    successive batches, and each after the first conflicts, as one transaction each would."""
    await store.append("s/hot", 0, [funded("hot", 1)])
    results = await asyncio.gather(
        *(store.append("s/hot", 1, [funded("hot", i)]) for i in range(5)),
        return_exceptions=True,
    )
    assert results.count(2) == 1
    conflicts = [r for r in results if isinstance(r, WrongExpectedVersion)]
    assert len(conflicts) == 4 and {c.actual for c in conflicts} == {2}
    assert [e.stream_version for e in await store.read_stream("s/hot")] == [1, 2]


async def test_an_append_in_a_transaction_needs_the_stream_at_its_version(
    store: EventStore,
) -> None:
    with pytest.raises(WrongExpectedVersion) as err:
        async with store.transaction() as tx:
            await tx.append("s/none", 2, [funded("n", 1)])
    assert (err.value.expected, err.value.actual) == (2, 0)
    assert await store.count() == 0


async def test_random_concurrent_appends_apply_as_some_serial_order(
    store: EventStore, rng: random.Random
) -> None:
    """Many writers append to a few streams at guessed versions, all at once, in rounds: the
    appends that succeed on each stream form one chain of versions from 0, each failure wrote
    nothing, and the stored events are exactly the successful appends' (none half-applied)."""
    streams = [f"s/{i}" for i in range(4)]
    known = dict.fromkeys(streams, 0)
    wins: dict[str, list[tuple[int, int]]] = {s: [] for s in streams}
    written: set[str] = set()
    for _ in range(6):
        calls = []
        for _ in range(30):
            stream = rng.choice(streams)
            expected = max(0, known[stream] + rng.choice((-1, 0, 0, 1)))
            envs = [funded(stream, k) for k in range(rng.randint(1, 3))]
            calls.append((stream, expected, envs))
        results = await asyncio.gather(
            *(store.append(s, e, envs) for s, e, envs in calls), return_exceptions=True
        )
        for (stream, expected, envs), result in zip(calls, results, strict=True):
            if isinstance(result, WrongExpectedVersion):
                assert result.expected == expected != result.actual
                continue
            assert result == expected + len(envs)
            wins[stream].append((expected, result))
            written.update(e.event_id for e in envs)
        for stream in streams:
            known[stream] = max([known[stream], *(n for _, n in wins[stream])])
    stored: set[str] = set()
    for stream in streams:
        chain = sorted(wins[stream])
        assert [e for e, _ in chain] == [0, *(n for _, n in chain)][: len(chain)]  # one chain
        events = await store.read_stream(stream)
        assert [e.stream_version for e in events] == list(range(1, known[stream] + 1))
        stored.update(e.event_id for e in events)
    assert stored == written
