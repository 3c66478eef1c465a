"""Single-stream commands batched (services/kernel/command_batch.py) on a real store: the
concurrent ones share one transaction and one commit; each caller gets its own outcome or its
own refusal; a batch that breaks a constraint is run again command by command, so only the
command that breaks it alone fails, with the error it gets alone; one stream once a batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from google.protobuf.message import Message
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.command_batch import CommandBatcher, Plain
from services.kernel.errors import DomainError, FailedPrecondition
from services.kernel.events import Context, Envelope, payload_of, service_actor
from services.kernel.eventstore import EventStore
from services.kernel.pipeline import Aggregate, Decision, Outcome, Pipeline
from subsidy.v1 import events_pb2 as ev


async def version_of(conn: AsyncConnection, key: str) -> int | None:
    found = await conn.scalar(text("SELECT version FROM streams WHERE stream_id = :s"), {"s": key})
    return int(found) if found else None


async def versions_of(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, int]:
    rows = await conn.execute(
        text("SELECT stream_id, version FROM streams WHERE stream_id = ANY(:s) AND version > 0"),
        {"s": list(keys)},
    )
    return {r[0]: int(r[1]) for r in rows}


COUNTER: Aggregate[str, int] = Aggregate("counter", lambda key: key, version_of, versions_of)


async def one_per_pool(conn: AsyncConnection, env: Envelope) -> None:
    """A read model with a unique key (as eligibility's one qualification per order): two
    commands funding the same pool break it."""
    funded = payload_of(env)
    assert isinstance(funded, ev.BudgetFunded)
    await conn.execute(
        text("INSERT INTO funded_pools (pool_id, stream_id) VALUES (:p, :s)"),
        {"p": funded.pool_id, "s": env.stream_id},
    )


def fund(pool: str) -> Decision[int]:
    def decide(state: int | None) -> list[Message]:
        if (state or 0) >= 1:
            raise FailedPrecondition("FUNDED", "funded once")
        return [ev.BudgetFunded(pool_id=pool, amount_fen=100)]

    return decide


class Commits:
    """The transactions the store's engine commits."""

    def __init__(self, store: EventStore) -> None:
        self.count = 0
        event.listen(store.engine.sync_engine, "commit", self._committed)

    def _committed(self, conn: Any) -> None:
        self.count += 1


@pytest.fixture
async def batched(store: EventStore) -> AsyncIterator[CommandBatcher[str, int]]:
    async with store.engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE funded_pools (pool_id text PRIMARY KEY, stream_id text NOT NULL)")
        )
    pipeline = Pipeline(store, "test", one_per_pool)
    yield CommandBatcher(store, COUNTER, lambda: Plain(pipeline), name="test")


def ctx(n: int) -> Context:
    return Context(service_actor("test"), correlation_id=f"caller-{n}")


async def outcome(run: Any) -> Outcome[int] | str:
    try:
        return await run  # type: ignore[no-any-return]
    except DomainError as refusal:
        return refusal.reason
    except IntegrityError:
        return "IntegrityError"


async def test_concurrent_commands_share_one_transaction_each_with_its_own_context(
    store: EventStore, batched: CommandBatcher[str, int]
) -> None:
    commits = Commits(store)
    streams = [f"counter/{n}" for n in range(8)]
    results = await asyncio.gather(
        *(batched.run(s, fund(f"pool-{n}"), ctx(n)) for n, s in enumerate(streams))
    )
    assert batched.commit.stats.largest == 8 and batched.commit.stats.batches == 1
    assert commits.count == 1  # one transaction, one commit, for the eight
    for n, (stream, result) in enumerate(zip(streams, results, strict=True)):
        assert (result.stream_id, result.version, len(result.appended)) == (stream, 1, 1)
        assert result.state is None  # the state the decision saw (reload=False)
        [recorded] = await store.read_stream(stream)
        assert recorded.correlation_id == f"caller-{n}"


async def test_a_lone_command_is_a_batch_of_one(
    store: EventStore, batched: CommandBatcher[str, int]
) -> None:
    commits = Commits(store)
    result = await batched.run("counter/lone", fund("pool-lone"), ctx(0))
    assert (result.version, len(result.appended)) == (1, 1)
    assert (batched.commit.stats.batches, batched.commit.stats.largest, commits.count) == (1, 1, 1)


async def test_a_refusal_in_a_batch_is_only_its_own(
    store: EventStore, batched: CommandBatcher[str, int]
) -> None:
    await batched.run("counter/b", fund("pool-b"), ctx(0))  # funded once already
    commits = Commits(store)
    results = await asyncio.gather(
        outcome(batched.run("counter/a", fund("pool-a"), ctx(1))),
        outcome(batched.run("counter/b", fund("pool-b2"), ctx(2))),
        outcome(batched.run("counter/c", fund("pool-c"), ctx(3))),
    )
    assert batched.commit.stats.largest == 3
    assert results[1] == "FUNDED"
    for result in (results[0], results[2]):
        assert not isinstance(result, str) and result.version == 1
    assert commits.count == 1  # the refusal did not break the batch
    assert [e.stream_version for e in await store.read_stream("counter/b")] == [1]


async def test_a_batch_that_breaks_a_constraint_is_run_again_one_by_one(
    store: EventStore, batched: CommandBatcher[str, int]
) -> None:
    await batched.run("counter/first", fund("pool-taken"), ctx(0))
    results = await asyncio.gather(
        outcome(batched.run("counter/x", fund("pool-x"), ctx(1))),
        outcome(batched.run("counter/y", fund("pool-taken"), ctx(2))),  # breaks the unique key
        outcome(batched.run("counter/z", fund("pool-z"), ctx(3))),
        outcome(batched.run("counter/first", fund("pool-again"), ctx(4))),  # refused alone too
    )
    assert batched.commit.stats.largest == 4
    assert results[1] == "IntegrityError"  # the error it gets alone, and only it
    assert results[3] == "FUNDED"  # its own refusal, not the batch's error
    for result in (results[0], results[2]):
        assert not isinstance(result, str) and result.version == 1
    assert await store.read_stream("counter/y") == []


async def test_two_commands_on_one_stream_go_in_two_batches_in_arrival_order(
    store: EventStore, batched: CommandBatcher[str, int]
) -> None:
    def add(pool: str) -> Decision[int]:
        return lambda state: [ev.BudgetFunded(pool_id=pool, amount_fen=1)]

    results = await asyncio.gather(
        batched.run("counter/same", add("pool-1"), ctx(1)),
        batched.run("counter/other", add("pool-2"), ctx(2)),
        batched.run("counter/same", add("pool-3"), ctx(3)),
    )
    assert [r.version for r in results] == [1, 1, 2]
    assert results[2].state == 1  # it saw the first one's event
    assert batched.commit.stats.batches == 2
    recorded = await store.read_stream("counter/same")
    assert [e.correlation_id for e in recorded] == ["caller-1", "caller-3"]
