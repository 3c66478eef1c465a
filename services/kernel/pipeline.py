"""The one way to run a command: lock the stream, load the state, decide, append, project.

Every service's use cases, and the catalog's bulk importer, run their commands through
:meth:`Pipeline.run`, so each command takes the same five steps in one transaction:

1. **lock** the aggregate's stream (writers of one stream queue here; a new stream is created
   locked, see :meth:`Tx.lock_stream`);
2. **load** the aggregate's state from the service's read models, which are kept current in the
   same transaction as every append (so the state read under the lock is the committed truth);
3. **decide**: call the pure decision (``domain.py``) with that state; it returns the events to
   append or raises a named :class:`~services.kernel.errors.DomainError`, and then nothing is
   written;
4. **append** the events to the stream at the version read under the lock;
5. **project** each event into the read models (each service's ``projections.apply_event``,
   which calls its domain's ``evolve``), still inside the transaction.

An :class:`Aggregate` says, once per kind of stream, how its stream is named and how its state
is loaded. A use case builds the command, calls ``run`` and returns what it gives back.

:meth:`Pipeline.run_many` takes the same five steps for many commands on many streams of one
aggregate at once (the catalog's bulk import: one new ``product/{sku}`` stream per row): it
locks every stream, loads every state, decides each command, and appends and projects in a
few batched statements, in one transaction, so a decision refusing any command writes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .events import Context, Envelope, new_envelope
from .eventstore import EventStore, Projector, Tx, WrongExpectedVersion, events_table

K = TypeVar("K")
S = TypeVar("S")


@dataclass(frozen=True)
class Aggregate(Generic[K, S]):
    """One kind of stream: how its id is formed from a key, and how its state is loaded.

    ``load`` reads the state under the stream's lock from the inline read models and returns
    None for an aggregate that has no events yet; the decision decides what None means.
    """

    name: str
    stream: Callable[[K], str]
    load: Callable[[AsyncConnection, K], Awaitable[S | None]]
    # Optional: the states of many keys in one query (absent keys have no state), for run_many.
    load_many: Callable[[AsyncConnection, Sequence[K]], Awaitable[Mapping[K, S]]] | None = None


@dataclass(frozen=True)
class Outcome(Generic[S]):
    """What a command did: the state after it (reloaded if anything was appended) and the
    envelopes it appended (empty when the decision had nothing to do, e.g. a repeat)."""

    state: S | None
    appended: tuple[Envelope, ...]
    stream_id: str
    version: int


Decision = Callable[[S | None], Sequence[Message]]
# Applies many envelopes to the read models at once (in order); defaults to the projector's loop.
BatchProjector = Callable[[AsyncConnection, Sequence[Envelope]], Awaitable[None]]


class Pipeline:
    """A service's command runner over its event store and its projector."""

    def __init__(
        self,
        store: EventStore,
        service: str,
        project: Projector,
        *,
        project_many: BatchProjector | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.project = project
        self.project_many = project_many

    async def run(
        self,
        aggregate: Aggregate[K, S],
        key: K,
        decide: Decision[S],
        ctx: Context,
        *,
        tx: Tx | None = None,
    ) -> Outcome[S]:
        """Run one command in one transaction (``tx``'s, when the use case has work of its own
        to commit with it, such as a consumer's handled mark)."""
        if tx is not None:
            return await self._run(tx, aggregate, key, decide, ctx)
        async with self.store.transaction() as own:
            return await self._run(own, aggregate, key, decide, ctx)

    async def _run(
        self, tx: Tx, aggregate: Aggregate[K, S], key: K, decide: Decision[S], ctx: Context
    ) -> Outcome[S]:
        stream = aggregate.stream(key)
        version = await tx.lock_stream(stream)
        state = await aggregate.load(tx.conn, key)
        events = list(decide(state))
        if not events:
            return Outcome(state, (), stream, version)
        envs = await tx.emit(self.service, stream, version, events, ctx, self.project)
        after = await aggregate.load(tx.conn, key)
        return Outcome(after, tuple(envs), stream, version + len(envs))

    async def run_many(
        self,
        aggregate: Aggregate[K, S],
        commands: Sequence[tuple[K, Decision[S]]],
        ctx: Context,
        *,
        tx: Tx,
    ) -> list[Outcome[S]]:
        """Run one command per key (keys distinct) in ``tx``, with batched statements.

        The same steps as :meth:`run`: lock every stream (in stream order, so two batches never
        deadlock), load every state, decide each command, append, project. A refusal raises
        before anything is appended, and the caller's transaction then rolls back whole.
        """
        streams = [aggregate.stream(key) for key, _ in commands]
        versions, created = await _lock_streams(tx, streams)
        if aggregate.load_many is not None:
            states: Mapping[K, S] = await aggregate.load_many(tx.conn, [k for k, _ in commands])
        else:
            loaded = {key: await aggregate.load(tx.conn, key) for key, _ in commands}
            states = {key: state for key, state in loaded.items() if state is not None}
        planned = [
            (stream, key, list(decide(states.get(key))))
            for stream, (key, decide) in zip(streams, commands, strict=True)
        ]
        appends: list[tuple[str, int, list[Envelope]]] = []
        for stream, _, events in planned:
            envs = [new_envelope(self.service, stream, e, ctx) for e in events]
            for i, env in enumerate(envs, start=1):
                env.stream_version = versions[stream] + i
            appends.append((stream, versions[stream], envs))
        await _append_many(tx, appends)
        # A stream created here that got no event is dropped before commit, as lock_stream's
        # are (on a refusal the whole transaction rolls back, placeholders with it).
        tx._placeholders.update(s for s, _, envs in appends if s in created and not envs)
        appended = [env for _, _, envs in appends for env in envs]
        if self.project_many is not None:
            await self.project_many(tx.conn, appended)
        else:
            for env in appended:
                await self.project(tx.conn, env)
        return [
            Outcome(states.get(key), tuple(envs), stream, version + len(envs))
            for (stream, key, _), (_, version, envs) in zip(planned, appends, strict=True)
        ]


async def _lock_streams(tx: Tx, streams: Sequence[str]) -> tuple[dict[str, int], set[str]]:
    """:meth:`Tx.lock_stream` for many streams in two statements: create the missing ones
    (locked by this transaction until it ends; a concurrent creator waits on the key), then
    lock the existing ones. Returns each stream's version, and the streams created."""
    versions: dict[str, int] = {}
    placeholders: set[str] = set()
    wanted = sorted(set(streams))
    while wanted:  # once, unless a stream vanished between the two statements (see below)
        created = (
            await tx.conn.execute(
                text(
                    "INSERT INTO streams (stream_id, version) "
                    "SELECT s, 0 FROM unnest(CAST(:ids AS text[])) AS s ORDER BY s "
                    "ON CONFLICT DO NOTHING RETURNING stream_id"
                ).bindparams(bindparam("ids", wanted))
            )
        ).scalars()
        placeholders.update(created)
        versions.update({s: 0 for s in placeholders})
        rest = [s for s in wanted if s not in placeholders]
        if rest:
            rows = await tx.conn.execute(
                text(
                    "SELECT stream_id, version FROM streams "
                    "WHERE stream_id = ANY(CAST(:ids AS text[])) ORDER BY stream_id FOR UPDATE"
                ).bindparams(bindparam("ids", rest))
            )
            versions.update({r.stream_id: int(r.version) for r in rows})
        # A concurrent creator's placeholder that was rolled back is gone: create it again.
        wanted = [s for s in rest if s not in versions]
    return versions, placeholders


async def _append_many(tx: Tx, appends: Sequence[tuple[str, int, Sequence[Envelope]]]) -> None:
    """:meth:`Tx.append` for many streams in two statements (every stream is locked)."""
    moved = [(s, v, v + len(envs)) for s, v, envs in appends if envs]
    if not moved:
        return
    updated = (
        await tx.conn.execute(
            text(
                "UPDATE streams SET version = m.new FROM unnest("
                "CAST(:ids AS text[]), CAST(:old AS bigint[]), CAST(:new AS bigint[])) "
                "AS m(id, old, new) WHERE streams.stream_id = m.id AND streams.version = m.old "
                "RETURNING streams.stream_id"
            ).bindparams(
                bindparam("ids", [s for s, _, _ in moved]),
                bindparam("old", [v for _, v, _ in moved]),
                bindparam("new", [n for _, _, n in moved]),
            )
        )
    ).scalars()
    missed = {s for s, _, _ in moved} - set(updated)
    if missed:  # cannot happen under the locks; refuse rather than write a gap
        stream = min(missed)
        expected = next(v for s, v, _ in moved if s == stream)
        raise WrongExpectedVersion(stream, expected, -1)
    rows = [
        {
            "event_id": env.event_id,
            "stream_id": env.stream_id,
            "stream_version": env.stream_version,
            "event_type": env.event_type,
            "envelope": env.SerializeToString(deterministic=True),
        }
        for _, _, envs in appends
        for env in envs
    ]
    await tx.conn.execute(events_table.insert(), rows)
    tx.appended += len(rows)
