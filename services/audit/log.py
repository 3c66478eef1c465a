"""The audit log's storage: every event of every service, once, in a SHA-256 hash chain.

How entries are hashed and chained is in :mod:`services.audit.domain`; PostgreSQL computes the
same chain step in the append statement below (``sha256(chain_hash || leaf)``), and the
auditor's replay (``verify.py``) recomputes it with the domain's functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kernel.events import Envelope
from services.kernel.eventstore import APPEND_ONLY, GRANTS, EventStore, Tx
from services.kernel.sql import Statement

from .domain import GENESIS, leaf_hash

metadata = MetaData()
entries = Table(
    "audit_entries",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("service", String(32), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("chain_hash", LargeBinary(32), nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    # The log itself: the audit service's runtime role appends and reads, never rewrites.
    info={GRANTS: APPEND_ONLY},
)
head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("chain_hash", LargeBinary(32), nullable=False),
    # Advanced by every append (UPDATE) and created once at start (INSERT): never deleted.
    info={GRANTS: ("SELECT", "INSERT", "UPDATE")},
)
# One statement per event: advance the head (a row lock serialises appends) and insert the
# entry with the new chain hash, computed by PostgreSQL from the previous one. Compiled once and
# run prepared (services/kernel/sql.py): it runs for every event of every service.
_APPEND = Statement(
    text(
        """
    WITH h AS (
        UPDATE audit_head SET size = size + 1, chain_hash = sha256(chain_hash || :leaf)
        WHERE id = 1 RETURNING size - 1 AS idx, chain_hash
    )
    INSERT INTO audit_entries (idx, event_id, service, event_type, leaf_hash, chain_hash, envelope)
    SELECT h.idx, :event_id, :service, :event_type, :leaf, h.chain_hash, :envelope FROM h
    """
    ),
    name="audit append",
)

# A batch of events in one statement, for a consumer that hands its handler the batch (the
# kernel's consumer calls a handler per event today): the head row locked, the chain extended
# entry by entry (PostgreSQL's sha256, as above), every entry inserted and the head advanced.
# The locking read waits for a concurrent append and reads the head it committed.
_APPEND_ALL = Statement(
    text(
        """
    WITH RECURSIVE
    new AS (
        SELECT * FROM unnest(
            CAST(:leaves AS bytea[]), CAST(:event_ids AS text[]), CAST(:services AS text[]),
            CAST(:event_types AS text[]), CAST(:envelopes AS bytea[])
        ) WITH ORDINALITY AS n(leaf, event_id, service, event_type, envelope, i)
    ),
    h AS (SELECT size, chain_hash FROM audit_head WHERE id = 1 FOR UPDATE),
    chain(i, idx, chain_hash) AS (
        SELECT 0::bigint, size - 1, chain_hash FROM h
        UNION ALL
        SELECT n.i, c.idx + 1, sha256(c.chain_hash || n.leaf)
        FROM chain c JOIN new n ON n.i = c.i + 1
    ),
    added AS (
        INSERT INTO audit_entries
            (idx, event_id, service, event_type, leaf_hash, chain_hash, envelope)
        SELECT c.idx, n.event_id, n.service, n.event_type, n.leaf, c.chain_hash, n.envelope
        FROM chain c JOIN new n ON n.i = c.i
        RETURNING idx, chain_hash
    )
    UPDATE audit_head SET size = a.idx + 1, chain_hash = a.chain_hash
    FROM (SELECT idx, chain_hash FROM added ORDER BY idx DESC LIMIT 1) AS a
    WHERE id = 1
    """
    ),
    name="audit append all",
)


async def ensure_head(store: EventStore) -> None:
    """Create the head row once (at start), so appends never need an upsert."""
    async with store.transaction() as tx:
        await tx.conn.execute(
            pg_insert(head).values(id=1, size=0, chain_hash=GENESIS).on_conflict_do_nothing()
        )


class AuditHeadMissing(RuntimeError):
    """The head row is gone (e.g. a partial restore): no entry can be chained."""


async def append(tx: Tx, env: Envelope) -> None:
    """Append one event (the consumer has already made sure it is new).

    Without the head row the statement inserts nothing and raises nothing: raise here, so the
    transaction (and the consumer's mark that the event was handled) rolls back, and the
    consumer retries, then dead-letters the event with an alert, instead of losing it."""
    data = env.SerializeToString(deterministic=True)
    appended = await _APPEND.run(
        tx.conn,
        leaf=leaf_hash(data),
        event_id=env.event_id,
        service=env.service,
        event_type=env.event_type,
        envelope=data,
    )
    if appended != 1:
        raise AuditHeadMissing(
            f"audit_head row 1 is missing: event {env.event_id} was not appended; restore the "
            "audit database (head and entries) from one backup"
        )


async def append_all(tx: Tx, envs: Sequence[Envelope]) -> None:
    """Append several events, in order, in one statement: the same entries and chain as
    :func:`append` one by one (the consumer has already made sure each is new). Without the
    head row nothing is appended and :class:`AuditHeadMissing` is raised, as by :func:`append`."""
    if not envs:
        return
    data = [env.SerializeToString(deterministic=True) for env in envs]
    advanced = await _APPEND_ALL.run(
        tx.conn,
        leaves=[leaf_hash(d) for d in data],
        event_ids=[env.event_id for env in envs],
        services=[env.service for env in envs],
        event_types=[env.event_type for env in envs],
        envelopes=data,
    )
    if advanced != 1:
        raise AuditHeadMissing(
            f"audit_head row 1 is missing: {len(envs)} events from {envs[0].event_id} were not "
            "appended; restore the audit database (head and entries) from one backup"
        )


async def info(store: EventStore) -> tuple[int, bytes, dict[str, int]]:
    async with store.engine.connect() as conn:
        row = (await conn.execute(select(head.c.size, head.c.chain_hash))).first()
        by_service: dict[str, int] = dict(
            (
                await conn.execute(
                    select(entries.c.service, func.count()).group_by(entries.c.service)
                )
            ).all()
        )
    size, chained = (row.size, row.chain_hash) if row else (0, GENESIS)
    return int(size), bytes(chained), {k: int(v) for k, v in by_service.items()}


async def read(store: EventStore, start: int, limit: int) -> list[tuple[int, bytes, bytes, bytes]]:
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(entries.c.idx, entries.c.leaf_hash, entries.c.chain_hash, entries.c.envelope)
                .where(entries.c.idx >= start)
                .order_by(entries.c.idx)
                .limit(limit)
            )
        ).all()
    return [(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]


async def size(store: EventStore) -> int:
    """How many entries the log holds (its head; no count over the entries)."""
    async with store.engine.connect() as conn:
        found = await conn.scalar(select(head.c.size).where(head.c.id == 1))
    return int(found or 0)
