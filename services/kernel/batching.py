"""Group commit: concurrent commands of one hot group decided together, one transaction a batch.

When every command of a group takes the same row lock (the claims of one category and day all
lock that day's quota row), running them one transaction each makes them queue on the lock:
each waits for the one before it to commit, and each pays the whole statement sequence alone.
:class:`GroupCommit` gathers what was submitted for a group while the group's previous batch
was running and hands it to ``flush`` as one batch; the caller's ``flush`` decides the batch in
one transaction (``Pipeline.run_many``) and returns one result per item.

- One batch at a time per group and process: a batch is the group's queue while the one before
  it commits, so it grows with the load by itself (one item when calls are rare, many under a
  rush) and no item waits longer than one batch for its turn.
- ``linger_s``: while the group is busy (a batch has just run and more are waiting), the next
  batch waits that long to gather more, so that a rush is decided in fewer, larger batches;
  the first batch after a quiet spell starts at once (a lone call pays nothing).
- ``distinct``: at most one item per key in a batch (``run_many`` takes each stream once); a
  second item for the same key waits for the next batch, behind the first.
- A caller that gave up before its batch started (a cancelled RPC) is left out of it.
- ``flush`` returns a value or an exception per item; the submitter gets the value or sees the
  exception raised. A ``flush`` that raises fails every item of its batch with that exception.

Correctness across processes is not this module's: each batch takes the same locks a single
command would (the pipeline's stream locks, the quota row), so batches of two replicas queue on
them in the database as single commands do.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Generic, TypeVar

G = TypeVar("G", bound=Hashable)  # a group: the items that share the hot lock
T = TypeVar("T")  # an item
R = TypeVar("R")  # an item's result

Flush = Callable[[G, Sequence[T]], Awaitable[Sequence[R | BaseException]]]


# Turns of the event loop a batch waits for callers still on their way in (:func:`arrivals`).
# A request's way in through the gRPC server takes several turns of its own, so a batch that went
# at the first turn that brought no one met nearly every call alone under a steady stream at a
# busy core (python -m bench.verify_item: one statement per call at 1 idle turn, one per five
# at 4 of 32).
IDLE_TURNS = 4
MAX_TURNS = 32


async def arrivals(waiting: Sized, *, idle: int = IDLE_TURNS, most: int = MAX_TURNS) -> None:
    """Turn the event loop while callers keep joining ``waiting``: return once ``idle`` turns
    in a row brought none (a lone caller waits that many turns, no more), or after ``most``."""
    quiet = 0
    for _ in range(most):
        joined = len(waiting)
        await asyncio.sleep(0)
        quiet = quiet + 1 if len(waiting) == joined else 0
        if quiet >= idle:
            return


@dataclass
class _Queue(Generic[T, R]):
    waiting: deque[tuple[T, asyncio.Future[R]]] = field(default_factory=deque)
    running: asyncio.Task[None] | None = None


@dataclass
class BatchStats:
    """What the batches were, for the metrics and the tests."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)


class GroupCommit(Generic[G, T, R]):
    """Submit items per group; each group's items are flushed in batches, one at a time."""

    def __init__(
        self,
        flush: Flush[G, T, R],
        *,
        max_batch: int = 256,
        linger_s: float = 0.0,
        distinct: Callable[[T], Hashable] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self._max = max_batch
        self._linger_s = linger_s
        self._distinct = distinct
        self._on_batch = on_batch
        self._groups: dict[G, _Queue[T, R]] = {}
        self.stats = BatchStats()

    def queued(self, group: G) -> int:
        """How many items of ``group`` wait for a batch (not counting the running one's)."""
        queue = self._groups.get(group)
        return len(queue.waiting) if queue is not None else 0

    async def submit(self, group: G, item: T) -> R:
        """Queue ``item`` in ``group`` and wait for its result (or its exception)."""
        queue = self._groups.setdefault(group, _Queue())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.waiting.append((item, future))
        if queue.running is None:
            # A fresh context: the batch is no one caller's (not their trace, not their identity).
            queue.running = asyncio.create_task(
                self._drain(group, queue), context=contextvars.Context()
            )
        return await future

    def _take(self, queue: _Queue[T, R]) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch: up to max_batch live items, one per distinct key, in arrival order;
        the others stay queued, in order."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        later: deque[tuple[T, asyncio.Future[R]]] = deque()
        keys: set[Hashable] = set()
        while queue.waiting and len(batch) < self._max:
            item, future = queue.waiting.popleft()
            if future.done():  # its caller was cancelled before the batch: leave it out
                continue
            if self._distinct is not None:
                key = self._distinct(item)
                if key in keys:
                    later.append((item, future))
                    continue
                keys.add(key)
            batch.append((item, future))
        queue.waiting.extendleft(reversed(later))
        return batch

    async def _drain(self, group: G, queue: _Queue[T, R]) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        busy = False
        try:
            while queue.waiting:
                # Let the callers that arrived in the same turn of the loop join this batch,
                # and under a rush those of the next linger_s too.
                await asyncio.sleep(self._linger_s if busy else 0)
                busy = True
                batch = self._take(queue)
                if not batch:
                    continue
                self.stats.record(len(batch))
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                try:
                    results = await self._flush(group, [item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError("flush returned a result count unlike its batch")
                except Exception as exc:  # every item of the batch fails with it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            queue.running = None
            # Cancelled (shutdown): no caller may wait for ever, in the batch or behind it.
            for _, future in [*batch, *queue.waiting]:
                if not future.done():
                    future.set_exception(RuntimeError("the batch runner stopped"))
            queue.waiting.clear()
            if self._groups.get(group) is queue and not queue.waiting:
                del self._groups[group]
