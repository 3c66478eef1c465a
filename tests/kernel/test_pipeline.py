"""The one command pipeline (services/kernel/pipeline.py) on a real store: lock, load, decide,
append, project, one transaction; a refusal writes nothing; reload is the caller's choice."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.errors import FailedPrecondition
from services.kernel.events import Context, Envelope, service_actor
from services.kernel.eventstore import EventStore
from services.kernel.pipeline import Aggregate, Pipeline
from subsidy.v1 import events_pb2 as ev

CTX = Context(service_actor("test"))


async def version_of(conn: AsyncConnection, key: str) -> int | None:
    found = await conn.scalar(text("SELECT version FROM streams WHERE stream_id = :s"), {"s": key})
    return int(found) if found else None


COUNTER: Aggregate[str, int] = Aggregate("counter", lambda key: key, version_of)


async def no_read_model(conn: AsyncConnection, env: Envelope) -> None:
    return None


def add_one(state: int | None) -> list[ev.BudgetFunded]:
    if (state or 0) >= 2:
        raise FailedPrecondition("FULL", "two is the most")
    return [ev.BudgetFunded(pool_id="p", amount_fen=1)]


async def test_a_command_appends_at_the_locked_version_and_reloads_on_request(
    store: EventStore,
) -> None:
    pipeline = Pipeline(store, "test", no_read_model)
    first = await pipeline.run(COUNTER, "counter/a", add_one, CTX)
    assert (first.state, first.version, len(first.appended)) == (1, 1, 1)
    second = await pipeline.run(COUNTER, "counter/a", add_one, CTX, reload=False)
    assert (second.state, second.version) == (1, 2)  # the state the decision saw
    with pytest.raises(FailedPrecondition):
        await pipeline.run(COUNTER, "counter/a", add_one, CTX)
    assert await store.count() == 2  # the refusal wrote nothing
    assert [e.stream_version for e in await store.read_stream("counter/a")] == [1, 2]


async def test_a_refused_new_stream_leaves_no_stream_behind(store: EventStore) -> None:
    pipeline = Pipeline(store, "test", no_read_model)

    def refuse(state: int | None) -> list[ev.BudgetFunded]:
        raise FailedPrecondition("NO", "never")

    with pytest.raises(FailedPrecondition):
        await pipeline.run(COUNTER, "counter/new", refuse, CTX)
    nothing = await pipeline.run(COUNTER, "counter/empty", lambda s: [], CTX)
    assert (nothing.state, nothing.appended) == (None, ())
    async with store.engine.connect() as conn:
        assert await version_of(conn, "counter/new") is None
        assert await version_of(conn, "counter/empty") is None
