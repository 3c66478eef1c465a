"""services.kernel.sql: a Core statement compiled once and run on psycopg, on a real PostgreSQL —
the same rows and errors as SQLAlchemy gives, in the caller's transaction, and statements it
cannot run faithfully refused when they are built."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.kernel.eventstore import make_engine
from services.kernel.sql import Statement
from tests.conftest import Infra

meta = sa.MetaData()
pools = sa.Table(
    "pools",
    meta,
    sa.Column("pool_id", sa.Text, primary_key=True),
    sa.Column("available_fen", sa.BigInteger, nullable=False),
    sa.Column("open", sa.Boolean, nullable=False),
    sa.Column("tags", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("doc", JSONB, nullable=True),
)

INSERT = Statement(
    pools.insert().values(
        pool_id=sa.bindparam("pool"),
        available_fen=sa.bindparam("fen"),
        open=sa.bindparam("open"),
        tags=sa.bindparam("tags"),
    )
)
BY_ID = Statement(
    sa.select(pools.c.available_fen, pools.c.open, pools.c.tags, pools.c.doc).where(
        pools.c.pool_id == sa.bindparam("pool")
    )
)
# A value written into the statement (100) travels as a bound default.
RICH = Statement(
    sa.select(pools.c.pool_id)
    .where(pools.c.available_fen >= 100, pools.c.pool_id == sa.any_(sa.bindparam("ids")))
    .order_by(pools.c.pool_id)
)
TAKE = Statement(
    sa.update(pools)
    .where(pools.c.pool_id == sa.bindparam("pool"), pools.c.available_fen >= sa.bindparam("fen"))
    .values(available_fen=pools.c.available_fen - sa.bindparam("fen"))
    .returning(pools.c.available_fen)
)
CLOSE_ALL = Statement(sa.update(pools).values(open=False))


@pytest.fixture
async def engine(infra: Infra) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(infra.create_database("sql"))
    async with engine.begin() as conn:
        await conn.run_sync(meta.create_all)
    yield engine
    await engine.dispose()


async def test_rows_and_scalars_as_sqlalchemy_reads_them(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await INSERT.run_many(
            conn,
            [
                {"pool": "a", "fen": 50, "open": True, "tags": ["x"]},
                {"pool": "b", "fen": 500, "open": True, "tags": []},
                {"pool": "c", "fen": 900, "open": False, "tags": ["y", "z"]},
            ],
        )
        await conn.execute(sa.update(pools).where(pools.c.pool_id == "c").values(doc={"k": 1}))
    async with engine.begin() as conn:
        row = await BY_ID.first(conn, pool="c")
        assert row is not None
        assert (row.available_fen, row.open, row.tags, row.doc) == (
            900,
            False,
            ["y", "z"],
            {"k": 1},
        )
        via_core = (await conn.execute(BY_ID_CORE, {"pool": "c"})).one()
        assert tuple(row) == tuple(via_core)
        assert await BY_ID.first(conn, pool="nobody") is None
        assert [r.pool_id for r in await RICH.all(conn, ids=["a", "b", "c", "d"])] == ["b", "c"]
        assert await TAKE.scalar(conn, pool="b", fen=120) == 380
        assert await TAKE.scalar(conn, pool="a", fen=120) is None  # not enough: no row
        assert await CLOSE_ALL.run(conn) == 3


BY_ID_CORE = sa.select(pools.c.available_fen, pools.c.open, pools.c.tags, pools.c.doc).where(
    pools.c.pool_id == sa.bindparam("pool")
)


async def test_runs_in_the_callers_transaction(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        async with conn.begin() as tx:
            await INSERT.run(conn, pool="t", fen=1, open=True, tags=[])
            # SQLAlchemy on the same connection sees the row: one transaction.
            assert await conn.scalar(sa.select(sa.func.count()).select_from(pools)) == 1
            await tx.rollback()
        assert await conn.scalar(sa.select(sa.func.count()).select_from(pools)) == 0


async def test_driver_errors_are_raised_as_sqlalchemy_raises_them(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await INSERT.run(conn, pool="dup", fen=1, open=True, tags=[])
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await INSERT.run(conn, pool="dup", fen=2, open=True, tags=[])
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await INSERT.run_many(conn, [{"pool": "new", "fen": 1, "open": True, "tags": []}] * 2)
    async with engine.begin() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(pools)) == 1


async def test_a_missing_parameter_is_named_before_anything_is_sent(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        with pytest.raises(KeyError, match=r"missing parameter.*fen"):
            await TAKE.scalar(conn, pool="x")
        # The transaction is untouched: it goes on.
        assert await BY_ID.first(conn, pool="x") is None


class Colour(enum.Enum):
    RED = "red"


def test_statements_it_cannot_run_faithfully_are_refused_when_built() -> None:
    with pytest.raises(TypeError, match="expanding IN"):
        Statement(
            sa.select(pools.c.pool_id).where(
                pools.c.pool_id.in_(sa.bindparam("ids", expanding=True))
            )
        )
    with pytest.raises(TypeError, match="needs a processor"):  # a dict for JSONB: json.dumps
        Statement(pools.update().values(doc=sa.bindparam("doc")))
    with pytest.raises(TypeError, match="needs a processor"):  # an Enum converts both ways
        Statement(sa.select(sa.cast(pools.c.pool_id, sa.Enum(Colour))))
    with pytest.raises(TypeError, match="needs a processor"):  # numeric: Decimal from float
        Statement(sa.select(sa.cast(pools.c.available_fen, sa.Numeric)))
    with pytest.raises(TypeError, match="not a SQLAlchemy statement"):
        Statement("SELECT 1")  # type: ignore[arg-type]
