"""Single-stream commands under load: concurrent ones on different streams in one transaction.

A use case that runs one command on one stream (``Pipeline.run(aggregate, key, decide, ctx,
reload=False)``) pays a transaction and a commit per call. Under a rush its concurrent calls,
each on its own stream, can share them: :class:`CommandBatcher` gathers them through the
kernel's group commit (:class:`~services.kernel.batching.GroupCommit`) and runs each batch as
one ``Pipeline.run_many``: one lock statement for every stream (in stream order, so batches and
single commands never deadlock), one load (the aggregate's ``load_many``), each decision, one
append, the projections, one commit.

What a caller sees is what ``Pipeline.run`` would have given it:

- its own outcome, or its own refusal: a decision that raises a
  :class:`~services.kernel.errors.DomainError` in a batch writes nothing and that error reaches
  its caller, while the other commands of the batch go on;
- a batch whose transaction fails for anything else (a constraint of the read models, such as
  one qualification per order; a lost connection; a bug in one decision) is run again command
  by command, each alone in its own transaction, so every caller gets exactly the error its
  command gets alone (or its outcome) and not another's;
- each event records its own caller's context: correlation, and the trace its caller was in
  (the batch runs in a task of its own);
- a batch of one is ``Pipeline.run`` itself, and a lone call waits one turn of the event loop
  more than it did (group commit's first batch after a quiet spell starts at once).

A :class:`Scope` is what one transaction's commands share, made fresh for each transaction (a
batch's, or a command's alone): the pipeline to run them with, a wrapper of each decision (a
claim batch counts the quota the claims before it took) and each command's answer once the
transaction is over (eligibility's lock answers the qualification its projection wrote).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from . import metrics
from .batching import GroupCommit
from .errors import DomainError
from .events import Context, current_trace_context
from .eventstore import EventStore
from .pipeline import Aggregate, Decision, Outcome, Pipeline

log = logging.getLogger(__name__)

K = TypeVar("K")
S = TypeVar("S")
K_in = TypeVar("K_in", contravariant=True)


class Scope(Protocol[K_in, S]):
    """What the commands of one transaction share (see the module's docstring)."""

    @property
    def pipeline(self) -> Pipeline: ...

    def decision(self, key: K_in, decide: Decision[S]) -> Decision[S]:
        """The decision this transaction runs for ``decide`` (in arrival order)."""
        ...

    def answer(self, key: K_in, outcome: Outcome[S]) -> Outcome[S]:
        """What the command's caller gets, once its transaction has committed."""
        ...


@dataclass(frozen=True)
class Plain(Generic[K, S]):
    """A scope that runs the decisions as given and answers the pipeline's outcome."""

    pipeline: Pipeline

    def decision(self, key: K, decide: Decision[S]) -> Decision[S]:
        return decide

    def answer(self, key: K, outcome: Outcome[S]) -> Outcome[S]:
        return outcome


@dataclass(frozen=True)
class _Pending(Generic[K, S]):
    key: K
    decide: Decision[S]
    ctx: Context


class CommandBatcher(Generic[K, S]):
    """``Pipeline.run(aggregate, key, decide, ctx, reload=False)``, batched with the concurrent
    commands of the same group (``group`` of the key; one group by default) on other streams.

    ``scope`` makes a transaction's :class:`Scope`; ``aggregate.load_many`` loads a batch (its
    ``load`` a lone command). ``name`` labels the batch sizes in the metrics.
    """

    def __init__(
        self,
        store: EventStore,
        aggregate: Aggregate[K, S],
        scope: Callable[[], Scope[K, S]],
        *,
        name: str,
        group: Callable[[K], Hashable] = lambda _: None,
        max_batch: int = 256,
        linger_s: float = 0.0,
    ) -> None:
        self.store = store
        self.aggregate = aggregate
        self.scope = scope
        self.group = group
        self.commit: GroupCommit[Hashable, _Pending[K, S], Outcome[S]] = GroupCommit(
            self._flush,
            max_batch=max_batch,
            linger_s=linger_s,
            distinct=lambda p: aggregate.stream(p.key),  # run_many takes each stream once
            on_batch=metrics.BATCH_SIZE.labels(name).observe,
        )

    async def run(self, key: K, decide: Decision[S], ctx: Context) -> Outcome[S]:
        """Run the command in a batch; raises its refusal (or its error alone)."""
        if ctx.trace_context is None:  # the batch runs in its own task: keep the caller's trace
            ctx = replace(ctx, trace_context=current_trace_context())
        return await self.commit.submit(self.group(key), _Pending(key, decide, ctx))

    async def _alone(self, pending: _Pending[K, S]) -> Outcome[S] | BaseException:
        scope = self.scope()
        try:
            outcome = await scope.pipeline.run(
                self.aggregate,
                pending.key,
                scope.decision(pending.key, pending.decide),
                pending.ctx,
                reload=False,
            )
        except Exception as exc:
            return exc
        return scope.answer(pending.key, outcome)

    async def _flush(
        self, group: Hashable, batch: Sequence[_Pending[K, S]]
    ) -> list[Outcome[S] | BaseException]:
        if len(batch) == 1:
            return [await self._alone(batch[0])]
        scope = self.scope()
        refused: dict[int, DomainError] = {}

        def in_turn(i: int, pending: _Pending[K, S]) -> Decision[S]:
            decide = scope.decision(pending.key, pending.decide)

            def deciding(state: S | None) -> Sequence[Message]:
                try:
                    return decide(state)
                except DomainError as refusal:  # only its own: it writes nothing
                    refused[i] = refusal
                    return []

            return deciding

        try:
            async with self.store.transaction() as tx:
                outcomes = await scope.pipeline.run_many(
                    self.aggregate,
                    [(p.key, in_turn(i, p)) for i, p in enumerate(batch)],
                    [p.ctx for p in batch],
                    tx=tx,
                )
        except Exception:
            # Not a refusal (those are caught above): a constraint, the connection, a bug. Each
            # command alone gets exactly its own outcome or error.
            log.warning("a batch of %d commands failed; each alone now", len(batch), exc_info=True)
            return [await self._alone(p) for p in batch]
        return [
            refused[i] if i in refused else scope.answer(p.key, outcome)
            for i, (p, outcome) in enumerate(zip(batch, outcomes, strict=True))
        ]
