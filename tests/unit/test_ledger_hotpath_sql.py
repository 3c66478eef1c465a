"""kernel.sql refuses, when it is built, a statement whose columns have Python-side defaults:
SQLAlchemy fills those in on each execution, so a statement compiled once would bind them as
None (the ledger's reservation insert met this: its ``capture_flag`` went in NULL)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from services.kernel.sql import Statement
from services.ledger import handlers, projections

meta = sa.MetaData()
rows = sa.Table(
    "rows",
    meta,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("flag", sa.Text, nullable=False, default=""),
    sa.Column("seen", sa.Integer, nullable=False, default=lambda: 0, onupdate=lambda: 1),
    sa.Column("note", sa.Text, nullable=False, server_default="x"),  # the server's: fine
)


def test_a_python_side_default_is_refused_when_built() -> None:
    with pytest.raises(TypeError, match="flag, seen"):
        Statement(rows.insert().values(key=sa.bindparam("key")))
    with pytest.raises(TypeError, match="seen"):
        Statement(rows.update().values(flag=sa.bindparam("flag")))


def test_every_value_given_is_accepted() -> None:
    built = Statement(
        rows.insert().values(key=sa.bindparam("key"), flag="", seen=sa.bindparam("seen"))
    )
    assert "note" not in built.sql  # left to the server's default
    Statement(rows.update().values(flag=sa.bindparam("flag"), seen=2))


def test_the_ledgers_hot_path_statements_bind_no_default() -> None:
    """Each is built at import; the reservation's insert writes every column's value."""
    assert "capture_flag" in projections.RESERVATION_INSERT.sql
    assert isinstance(handlers.ATTEMPT_STARTED, Statement)
