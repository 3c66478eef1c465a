"""The audit log's Merkle tree in PostgreSQL: integrated in batches, proofs for any past size.

The consumer appends one entry per event (:mod:`services.audit.log`). :func:`integrate` then
takes the entries appended since, in batches: it recomputes each leaf from the entry's stored
bytes (an entry changed between its append and its integration is refused, with an alert),
extends the tree's right edge (a :class:`~services.kernel.contract.merkle.CompactRange` read
from the stored nodes), stores every complete subtree the batch completes in
``audit_tree_nodes`` (append-only: a node never changes once complete) and advances
``audit_tree.size``. Appending costs O(log n) hashes and, amortised, two node rows per entry.

Because complete subtrees never change, the nodes stored today answer inclusion and consistency
proofs for every size the tree has had: each proof element is one node or a right edge folded
from a few (:func:`services.kernel.contract.merkle.proof_hashes`), fetched in one query. The
tree is RFC 6962's, computed by :mod:`services.kernel.contract.merkle`, the same module the
auditor's CLI verifies with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any, Final

from google.protobuf import symbol_database
from google.protobuf.message import Message
from sqlalchemy import (
    ARRAY,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.kernel.contract import merkle
from services.kernel.contract.merkle import CompactRange, NodeId, Range
from services.kernel.events import Envelope
from services.kernel.eventstore import APPEND_ONLY, GRANTS, EventStore
from services.kernel.sql import Statement
from subsidy.v1 import audit_pb2

from .log import entries, head, metadata

Row = tuple[int, bytes, bytes, bytes]  # (index, leaf hash, chain hash, envelope bytes)
BATCH: Final = 5000  # entries integrated per transaction
MAX_KEY: Final = 64  # the longest correlation id or order id indexed

nodes = Table(
    "audit_tree_nodes",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
    # GetInclusionProof by leaf hash: the first entry with it.
    Index("audit_leaves_by_hash", "hash", "idx", postgresql_where=text("level = 0")),
    info={GRANTS: APPEND_ONLY},
)
tree = Table(
    "audit_tree",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    # Advanced by each integration (UPDATE), created once at start (INSERT): never deleted.
    info={GRANTS: ("SELECT", "INSERT", "UPDATE")},
)
# Which entries name which order (or other correlation id): what `audit prove` asks for.
named = Table(
    "audit_entry_keys",
    metadata,
    Column("key", String(MAX_KEY), primary_key=True),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    info={GRANTS: APPEND_ONLY},
)


class TreeCorrupt(RuntimeError):
    """The stored log or tree is not what was written: nothing is integrated or signed."""


# The statements of an integration, compiled once and run prepared (services/kernel/sql.py):
# the tree loop runs them every second and the checkout's profile found SQLAlchemy's
# per-statement work, and one INSERT per node and per key, in its share.
# The tree's size, locked until commit (one integration or publication at a time), and the
# log's: entries below the committed head size are committed (one transaction advances the
# head and inserts the entry, services/audit/log.py).
_SIZES = Statement(
    select(
        tree.c.size,
        select(head.c.size).where(head.c.id == 1).scalar_subquery().label("log_size"),
    )
    .where(tree.c.id == 1)
    .with_for_update(of=tree),
    name="audit tree sizes",
)
_ENTRIES = Statement(
    select(entries.c.idx, entries.c.leaf_hash, entries.c.envelope)
    .where(entries.c.idx >= bindparam("start"), entries.c.idx < bindparam("end"))
    .order_by(entries.c.idx),
    name="audit entries to integrate",
)
_WANTED = (
    func.unnest(
        bindparam("levels", type_=ARRAY(SmallInteger)), bindparam("idxs", type_=ARRAY(BigInteger))
    )
    .table_valued("level", "idx")
    .render_derived()
)
# Nodes by (level, index), the ids as two arrays: one prepared statement whatever their number
# (an IN list of tuples is a new statement for every length).
_NODES = Statement(
    select(nodes.c.level, nodes.c.idx, nodes.c.hash).join_from(
        nodes, _WANTED, and_(nodes.c.level == _WANTED.c.level, nodes.c.idx == _WANTED.c.idx)
    ),
    name="audit tree nodes",
)
_NEW_NODES = (
    func.unnest(
        bindparam("levels", type_=ARRAY(SmallInteger)),
        bindparam("idxs", type_=ARRAY(BigInteger)),
        bindparam("hashes", type_=ARRAY(LargeBinary)),
    )
    .table_valued("level", "idx", "hash")
    .render_derived()
)
_NEW_KEYS = (
    func.unnest(
        bindparam("keys", type_=ARRAY(String)), bindparam("key_idxs", type_=ARRAY(BigInteger))
    )
    .table_valued("key", "idx")
    .render_derived()
)
# What a batch adds, in one statement: its complete subtrees, the keys its entries are found
# by, and the tree's new size (before: an INSERT per node and per key, and the UPDATE).
_EXTEND = Statement(
    update(tree)
    .where(tree.c.id == 1)
    .values(size=bindparam("size"))
    .add_cte(
        insert(nodes)
        .from_select(
            ["level", "idx", "hash"],
            select(_NEW_NODES.c.level, _NEW_NODES.c.idx, _NEW_NODES.c.hash),
        )
        .cte("new_nodes")
    )
    .add_cte(
        pg_insert(named)
        .from_select(["key", "idx"], select(_NEW_KEYS.c.key, _NEW_KEYS.c.idx))
        .on_conflict_do_nothing()
        .cte("new_keys")
    ),
    name="audit tree extend",
)
_NO_TREE = "audit_tree row 1 is missing: restore the audit database from a backup"


async def ensure_tree(store: EventStore) -> None:
    """Create the tree's head row once (at start)."""
    async with store.transaction() as tx:
        await tx.conn.execute(pg_insert(tree).values(id=1, size=0).on_conflict_do_nothing())


async def size_of(conn: AsyncConnection, *, lock: bool = False) -> int:
    """How many entries the tree holds; ``lock`` holds the head row until commit (one
    integration or publication at a time)."""
    query = select(tree.c.size).where(tree.c.id == 1)
    found = await conn.scalar(query.with_for_update() if lock else query)
    if found is None:
        raise TreeCorrupt(_NO_TREE)
    return int(found)


async def stored_nodes(conn: AsyncConnection, ids: Iterable[NodeId]) -> dict[NodeId, bytes]:
    """The stored hashes of these nodes; a node that should exist and does not is corruption."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    rows = await _NODES.all(conn, levels=[n[0] for n in wanted], idxs=[n[1] for n in wanted])
    found = {(int(r[0]), int(r[1])): bytes(r[2]) for r in rows}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise TreeCorrupt(f"the tree is missing its nodes {missing[:5]}")
    return found


async def right_edge(conn: AsyncConnection, size: int) -> CompactRange:
    """The tree of ``size`` leaves as its right edge, from the stored nodes."""
    ids = merkle.range_nodes(0, size)
    found = await stored_nodes(conn, ids)
    return CompactRange(size, [found[n] for n in ids])


async def root_at(conn: AsyncConnection, size: int) -> bytes:
    """The root of the tree when it had ``size`` leaves."""
    return (await right_edge(conn, size)).root()


@cache
def _order_payload(event_type: str) -> type[Message] | None:
    """The payload class of an event type that carries an ``order_id`` (else None)."""
    try:
        cls: type[Message] = symbol_database.Default().GetSymbol(event_type)
    except KeyError:  # a type this build does not know: found by its correlation id only
        return None
    return cls if "order_id" in cls.DESCRIPTOR.fields_by_name else None


def keys_of(data: bytes) -> set[str]:
    """What an entry is found by: its correlation id and the order its payload names."""
    env = Envelope.FromString(data)
    found = {env.correlation_id} if env.correlation_id else set()
    cls = _order_payload(env.event_type)
    if cls is not None:
        order_id = str(cls.FromString(env.payload).order_id)  # type: ignore[attr-defined]
        if order_id:
            found.add(order_id)
    return {k for k in found if len(k) <= MAX_KEY}


async def integrate(store: EventStore, batch: int = BATCH) -> int:
    """Integrate up to ``batch`` entries appended since the last call into the tree, in one
    transaction; returns how many (0 when the tree holds the whole log)."""
    async with store.transaction() as tx:
        conn = tx.conn
        sizes = await _SIZES.first(conn)
        if sizes is None:
            raise TreeCorrupt(_NO_TREE)
        size = int(sizes.size)
        end = min(int(sizes.log_size or 0), size + batch)
        if end <= size:
            return 0
        rows = await _ENTRIES.all(conn, start=size, end=end)
        edge = await right_edge(conn, size)
        levels: list[int] = []
        indexes: list[int] = []
        hashes: list[bytes] = []
        keys: list[str] = []
        key_indexes: list[int] = []

        def completed(level: int, index: int, h: bytes) -> None:
            levels.append(level)
            indexes.append(index)
            hashes.append(h)

        for idx, stored_leaf, data in rows:
            if idx != edge.size:
                raise TreeCorrupt(f"audit entry {edge.size} is missing from the log")
            data = bytes(data)
            leaf = merkle.leaf_hash(data)
            if leaf != bytes(stored_leaf):
                raise TreeCorrupt(f"audit entry {idx} was changed after it was written")
            edge.append(leaf, completed)
            for k in keys_of(data):
                keys.append(k)
                key_indexes.append(idx)
        if edge.size != end:
            raise TreeCorrupt(f"audit entry {edge.size} is missing from the log")
        await _EXTEND.run(
            conn,
            levels=levels,
            idxs=indexes,
            hashes=hashes,
            keys=keys,
            key_idxs=key_indexes,
            size=end,
        )
        return end - size


async def proof(conn: AsyncConnection, ranges: Sequence[Range]) -> list[bytes]:
    """The hashes of a proof's ranges, from the stored nodes (one query)."""
    found = await stored_nodes(conn, merkle.proof_nodes(ranges))
    return merkle.proof_hashes(ranges, found.__getitem__)


async def inclusion_proof(store: EventStore, index: int, size: int) -> tuple[bytes, list[bytes]]:
    """(leaf hash, inclusion proof) of entry ``index`` in the tree of ``size`` leaves."""
    async with store.engine.connect() as conn:
        ranges = merkle.inclusion_ranges(index, size)
        leaf = (await stored_nodes(conn, [(0, index)]))[(0, index)]
        return leaf, await proof(conn, ranges)


async def consistency_proof(store: EventStore, old_size: int, new_size: int) -> list[bytes]:
    """The consistency proof from the tree of ``old_size`` leaves to that of ``new_size``."""
    async with store.engine.connect() as conn:
        return await proof(conn, merkle.consistency_ranges(old_size, new_size))


async def index_of(store: EventStore, leaf: bytes, size: int) -> int | None:
    """The first entry below ``size`` whose leaf hash is ``leaf``."""
    async with store.engine.connect() as conn:
        found = await conn.scalar(
            select(func.min(nodes.c.idx)).where(
                nodes.c.level == 0, nodes.c.hash == leaf, nodes.c.idx < size
            )
        )
    return None if found is None else int(found)


async def current_size(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return await size_of(conn)


async def indexes_naming(store: EventStore, key: str, limit: int) -> list[int]:
    """The entries (in the tree) whose correlation id or order id is ``key``, in log order."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(named.c.idx).where(named.c.key == key).order_by(named.c.idx).limit(limit)
        )
        return [int(r[0]) for r in rows]


async def read_entries(
    store: EventStore,
    start: int = 0,
    limit: int = 0,
    *,
    end: int = 0,
    indexes: Sequence[int] = (),
) -> list[Row]:
    """Entries in log order (those in ``[start, end)``, or ``limit`` from ``start``, or
    those at ``indexes``), each with
    its leaf as the tree holds it (the stored nodes are what the signed root commits to), or as
    computed at its append if it is not integrated yet."""
    if end and not indexes:
        return await _range(store, start, end)
    leaf = nodes.alias("leaf")
    query = (
        select(
            entries.c.idx,
            func.coalesce(leaf.c.hash, entries.c.leaf_hash),
            entries.c.chain_hash,
            entries.c.envelope,
        )
        .select_from(entries.outerjoin(leaf, (leaf.c.level == 0) & (leaf.c.idx == entries.c.idx)))
        .order_by(entries.c.idx)
    )
    if indexes:
        query = query.where(entries.c.idx.in_(list(indexes)))
    else:
        query = query.where(entries.c.idx >= start).limit(limit)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]


# The auditor's download of the whole log, page by page: a range (not a LIMIT, so the planner
# joins each entry to its leaf by index), on the driver's connection (SQLAlchemy's row objects
# cost as much as the query at a million entries).
_RANGE = (
    "SELECT e.idx, coalesce(n.hash, e.leaf_hash), e.chain_hash, e.envelope"
    " FROM audit_entries e LEFT JOIN audit_tree_nodes n ON n.level = 0 AND n.idx = e.idx"
    " WHERE e.idx >= %s AND e.idx < %s ORDER BY e.idx"
)


async def _fetch_range(store: EventStore, start: int, end: int) -> list[Any]:
    async with store.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        # Binary results: the hashes and envelopes arrive as bytes, not as hex to decode.
        cursor = await driver.execute(_RANGE, (start, end), binary=True)
        rows: list[Any] = await cursor.fetchall()
    return rows


async def _range(store: EventStore, start: int, end: int) -> list[Row]:
    rows = await _fetch_range(store, start, end)
    return [(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]


# The same range as one row of packed columns, with the log's size read in the same snapshot:
# PostgreSQL concatenates the hashes and gathers the indexes and envelopes (in index order, the
# order both index scans deliver: no sort), so the service builds no object per entry but the
# envelopes' bytes. The range repeated on the nodes lets the planner merge two index range
# scans instead of probing the nodes' index once per entry.
_PACKED = (
    "SELECT (SELECT size FROM audit_head WHERE id = 1), array_agg(e.idx ORDER BY e.idx),"
    " string_agg(coalesce(n.hash, e.leaf_hash), ''::bytea ORDER BY e.idx),"
    " string_agg(e.chain_hash, ''::bytea ORDER BY e.idx), array_agg(e.envelope ORDER BY e.idx)"
    " FROM audit_entries e LEFT JOIN audit_tree_nodes n"
    " ON n.level = 0 AND n.idx = e.idx AND n.idx >= %(start)s AND n.idx < %(end)s"
    " WHERE e.idx >= %(start)s AND e.idx < %(end)s"
)


async def read_packed(
    store: EventStore, start: int, end: int
) -> tuple[int, audit_pb2.GetEntriesResponse]:
    """The log's size, and the entries in ``[start, end)`` as :func:`read_entries` gives them,
    in the packed columns of ``GetEntriesResponse``: one list per column, no object per entry
    (what the auditor downloads a million of)."""
    async with store.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        # Binary results: the hashes and envelopes arrive as bytes, not as hex to decode.
        cursor = await driver.execute(_PACKED, {"start": start, "end": end}, binary=True)
        size, indexes, leaves, chains, envelopes = await cursor.fetchone()
    if not indexes:  # no entry in the range (array_agg of nothing is NULL)
        return int(size or 0), audit_pb2.GetEntriesResponse()
    return int(size or 0), audit_pb2.GetEntriesResponse(
        indexes=indexes, leaf_hashes=leaves, chain_hashes=chains, envelopes=envelopes
    )
