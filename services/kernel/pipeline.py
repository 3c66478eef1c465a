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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection

from .events import Context, Envelope
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


@dataclass(frozen=True)
class Outcome(Generic[S]):
    """What a command did: the state after it (reloaded if anything was appended) and the
    envelopes it appended (empty when the decision had nothing to do, e.g. a repeat)."""

    state: S | None
    appended: tuple[Envelope, ...]
    stream_id: str
    version: int


Decision = Callable[[S | None], Sequence[Message]]


class Pipeline:
    """A service's command runner over its event store and its projector."""

    def __init__(self, store: EventStore, service: str, project: Projector) -> None:
        self.store = store
        self.service = service
        self.project = project

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
