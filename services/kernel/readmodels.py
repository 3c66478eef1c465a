"""Helpers for a service's read models that are not the event store's own tables."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")


async def load_new_rows(
    conn: AsyncConnection,
    key: ColumnElement[str],
    value: ColumnElement[str],
    known: MutableMapping[str, T],
    parse: Callable[[str], T],
) -> MutableMapping[str, T]:
    """Add to ``known`` every row of a table whose rows never change once written (approved
    policy versions) that it does not hold yet, parsed once; returns ``known``.

    Costs one small query (the keys) when nothing is new, so it can run on every refresh.
    """
    keys = (await conn.execute(select(key))).scalars().all()
    missing = [k for k in keys if k not in known]
    if missing:
        for k, v in await conn.execute(select(key, value).where(key.in_(missing))):
            known[k] = parse(v)
    return known
