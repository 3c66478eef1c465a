"""The budget gauges of a sharded pool are read off the checkout path, once a round
(services.ledger.projections.ShardedGauges): a round that cannot read leaves every pool due."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from services.ledger.projections import ShardedGauges


async def test_a_round_that_cannot_read_leaves_its_pools_due_for_the_next() -> None:
    gauges = ShardedGauges()
    gauges.mark("pool-b")
    gauges.mark("pool-a")
    # Nothing listens on port 1: the round's connection is refused, as in a database outage.
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(OperationalError):
            await gauges.refresh(engine)
    finally:
        await engine.dispose()
    assert gauges.due() == ["pool-a", "pool-b"]


async def test_a_round_with_nothing_marked_reads_nothing() -> None:
    # An engine that could not connect: a round with no pool due never opens it.
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        await ShardedGauges().refresh(engine)
    finally:
        await engine.dispose()
