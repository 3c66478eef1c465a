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
from sqlalchemy.ext.asyncio import AsyncConnection

from .events import Context, Envelope, new_envelope
from .eventstore import EventStore, Projector, Tx

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
        reload: bool = True,
    ) -> Outcome[S]:
        """Run one command in one transaction (``tx``'s, when the use case has work of its own
        to commit with it, such as a consumer's handled mark). ``reload=False`` skips loading
        the state again after an append (the outcome's ``state`` is then the one the decision
        saw): for use cases that answer from elsewhere, so the hot path pays no extra reads."""
        if tx is not None:
            return await self._run(tx, aggregate, key, decide, ctx, reload)
        async with self.store.transaction() as own:
            return await self._run(own, aggregate, key, decide, ctx, reload)

    async def _run(
        self,
        tx: Tx,
        aggregate: Aggregate[K, S],
        key: K,
        decide: Decision[S],
        ctx: Context,
        reload: bool,
    ) -> Outcome[S]:
        stream = aggregate.stream(key)
        version = await tx.lock_stream(stream)
        state = await aggregate.load(tx.conn, key)
        events = list(decide(state))
        if not events:
            return Outcome(state, (), stream, version)
        envs = await tx.emit(self.service, stream, version, events, ctx, self.project)
        after = await aggregate.load(tx.conn, key) if reload else state
        return Outcome(after, tuple(envs), stream, version + len(envs))

    async def run_many(
        self,
        aggregate: Aggregate[K, S],
        commands: Sequence[tuple[K, Decision[S]]],
        ctx: Context | Sequence[Context],
        *,
        tx: Tx,
    ) -> list[Outcome[S]]:
        """Run one command per key (keys distinct) in ``tx``, with batched statements.

        The same steps as :meth:`run`: lock every stream (in stream order, so two batches never
        deadlock), load every state, decide each command, append, project. The commands are
        decided in the order given, so a decision may count what the ones before it decided
        (the claim batch counts the quota so). A refusal raises before anything is appended,
        and the caller's transaction then rolls back whole. ``ctx`` is every command's, or one
        per command (commands of different callers, each with its own correlation and trace).
        """
        contexts = [ctx] * len(commands) if isinstance(ctx, Context) else list(ctx)
        if len(contexts) != len(commands):
            raise ValueError("run_many: one context per command")
        streams = [aggregate.stream(key) for key, _ in commands]
        versions = await tx.lock_streams(streams)
        if aggregate.load_many is not None:
            states: Mapping[K, S] = await aggregate.load_many(tx.conn, [k for k, _ in commands])
        else:
            loaded = {key: await aggregate.load(tx.conn, key) for key, _ in commands}
            states = {key: state for key, state in loaded.items() if state is not None}
        planned = [
            (stream, key, list(decide(states.get(key))))
            for stream, (key, decide) in zip(streams, commands, strict=True)
        ]
        appends = [
            (stream, versions[stream], [new_envelope(self.service, stream, e, c) for e in events])
            for (stream, _, events), c in zip(planned, contexts, strict=True)
        ]
        # A stream created here that gets no event is dropped before commit, as lock_stream's
        # are (on a refusal the whole transaction rolls back, placeholders with it).
        await tx.append_many(appends)
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
