"""The ledger's LockQualification calls batched (handlers.Eligibility.lock on the kernel's
CommandBatcher), on the real stack: concurrent locks on different consumers' streams share one
transaction, and in that batch a lock refused (already locked to another order, or its order
already holding a qualification) gets exactly the refusal it gets alone while the others lock,
each event keeping its own caller's correlation and trace; a retry answers as before."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
from sqlalchemy import text

from services.eligibility.handlers import Eligibility
from services.eligibility.projections import consumer_stream
from services.kernel.events import Envelope, payload_of
from services.kernel.telemetry import tracer
from subsidy.v1 import eligibility_pb2
from subsidy.v1 import events_pb2 as ev
from tests.e2e.conftest import Platform, status_of


def lock_request(qid: str, order: str, consumer: str) -> eligibility_pb2.LockQualificationRequest:
    return eligibility_pb2.LockQualificationRequest(
        qualification_id=qid,
        order_id=order,
        category="phone",
        consumer_id=consumer,
        platform_id="jd",
    )


async def until(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


class Locks:
    """Consumers with a phone qualification each, locked through the stack's eligibility as
    the ledger locks them, each call in a span of its own."""

    def __init__(self, p: Platform, run: str) -> None:
        self.p = p
        self.run = run
        self.e: Eligibility = p.running["eligibility"].wiring.registrations[0][1].e
        self.consumers: dict[str, str] = {}
        self.qids: dict[str, str] = {}

    async def add(self, rng: random.Random, *names: str) -> None:
        for n in names:
            self.consumers[n] = (await self.p.person(rng))[1]
            self.qids[n] = await self.p.claim(self.consumers[n], "phone")

    async def lock(self, name: str, order: str) -> tuple[str, str, int]:
        """(status or refusal, order, the caller's trace id)."""
        with tracer().start_as_current_span(f"lock {name}") as span:
            trace_id = span.get_span_context().trace_id
            try:
                q = await self.p.eligibility.LockQualification(
                    lock_request(self.qids[name], order, self.consumers[name])
                )
            except grpc.aio.AioRpcError as err:
                code, reason, _ = status_of(err)
                assert code is grpc.StatusCode.FAILED_PRECONDITION
                return reason, "", trace_id
            return q.status, q.order_id, trace_id

    async def in_one_batch(self, orders: dict[str, str]) -> dict[str, tuple[str, str, int]]:
        """Lock each of ``orders`` (name: order) in one batch: a first lock waits on its
        consumer's stream (held here), so these arrive while its batch runs and are the next
        batch, whole. Checks they were."""
        await self.add(random.Random(), held := f"held-{len(self.consumers)}")
        stats = self.e.locks.commit.stats
        batches, items = stats.batches, stats.items
        store = self.p.running["eligibility"].runtime.store
        async with store.transaction() as tx:
            await tx.lock_stream(consumer_stream(self.consumers[held]))
            first = asyncio.create_task(self.lock(held, f"{self.run}-{held}"))
            await until(lambda: stats.batches == batches + 1, "the held lock's batch started")
            tasks = {n: asyncio.create_task(self.lock(n, order)) for n, order in orders.items()}
            await until(lambda: self.e.locks.commit.queued(None) == len(tasks), "all queued")
        assert (await first)[:2] == ("LOCKED", f"{self.run}-{held}")
        results = {n: await task for n, task in tasks.items()}
        # Two batches: the held lock alone, then these together.
        assert (stats.batches - batches, stats.items - items) == (2, 1 + len(tasks))
        return results

    async def status(self, name: str) -> tuple[str, str]:
        q = await self.p.eligibility.GetQualification(
            eligibility_pb2.GetQualificationRequest(qualification_id=self.qids[name])
        )
        return q.status, q.order_id

    async def locked_events(self) -> dict[str, list[tuple[str, Any]]]:
        """Per qualification of this run: its QualificationLocked events (transaction id,
        envelope)."""
        store = self.p.running["eligibility"].runtime.store
        streams = [consumer_stream(c) for c in self.consumers.values()]
        async with store.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT tx_id::text, envelope FROM events WHERE stream_id = ANY(:s) "
                    "AND event_type LIKE '%QualificationLocked' ORDER BY position"
                ),
                {"s": streams},
            )
        found: dict[str, list[tuple[str, Any]]] = {}
        for tx_id, blob in rows:
            env = Envelope.FromString(blob)
            event = payload_of(env)
            assert isinstance(event, ev.QualificationLocked)
            found.setdefault(event.qualification_id, []).append((tx_id, env))
        return found


async def test_concurrent_locks_share_one_transaction_and_each_refusal_is_its_own(
    platform: Platform, rng: random.Random
) -> None:
    run = f"lb-{rng.randrange(10**12)}"
    w = Locks(platform, run)
    await w.add(rng, "b", "c", "locked", "g", "again")
    # Before: one locked to another order, one locked to the order its retry names.
    assert (await w.lock("locked", f"{run}-first"))[:2] == ("LOCKED", f"{run}-first")
    assert (await w.lock("again", f"{run}-again"))[:2] == ("LOCKED", f"{run}-again")
    orders = {
        "b": f"{run}-b",
        "c": f"{run}-c",
        "locked": f"{run}-second",  # already locked to {run}-first
        "g": f"{run}-g",
        "again": f"{run}-again",  # the ledger's retry: the same answer, nothing appended
    }
    results = await w.in_one_batch(orders)
    assert {n: r[:2] for n, r in results.items()} == {
        "b": ("LOCKED", f"{run}-b"),
        "c": ("LOCKED", f"{run}-c"),
        "locked": ("QUALIFICATION_LOCKED", ""),
        "g": ("LOCKED", f"{run}-g"),
        "again": ("LOCKED", f"{run}-again"),
    }
    assert await w.status("locked") == ("LOCKED", f"{run}-first")  # the refusal wrote nothing
    events = await w.locked_events()
    assert all(len(envs) == 1 for envs in events.values())  # the retry appended nothing
    batch = [events[w.qids[n]][0] for n in ("b", "c", "g")]
    assert len({tx_id for tx_id, _ in batch}) == 1  # one transaction for the three
    for name, (_, env) in zip(("b", "c", "g"), batch, strict=True):
        assert env.correlation_id == orders[name]  # each its own order ...
        assert format(results[name][2], "032x") in env.trace_context["traceparent"]  # and trace


async def test_a_lock_whose_order_has_a_qualification_is_refused_alone_in_its_batch(
    platform: Platform, rng: random.Random
) -> None:
    """The one-qualification-per-order constraint breaks the batch's transaction: the locks
    are run again one by one, and only the lock that breaks it is refused, as it is alone."""
    run = f"lc-{rng.randrange(10**12)}"
    w = Locks(platform, run)
    await w.add(rng, "owner", "taken", "x", "locked", "y")
    assert (await w.lock("owner", f"{run}-taken"))[:2] == ("LOCKED", f"{run}-taken")
    assert (await w.lock("locked", f"{run}-first"))[:2] == ("LOCKED", f"{run}-first")
    results = await w.in_one_batch(
        {
            "x": f"{run}-x",
            "taken": f"{run}-taken",  # that order holds the owner's qualification
            "locked": f"{run}-second",  # refused on its own too, with its own refusal
            "y": f"{run}-y",
        }
    )
    assert {n: r[:2] for n, r in results.items()} == {
        "x": ("LOCKED", f"{run}-x"),
        "taken": ("ORDER_HAS_QUALIFICATION", ""),
        "locked": ("QUALIFICATION_LOCKED", ""),
        "y": ("LOCKED", f"{run}-y"),
    }
    assert await w.status("taken") == ("AVAILABLE", "")
    assert await w.status("owner") == ("LOCKED", f"{run}-taken")
    events = await w.locked_events()
    assert w.qids["taken"] not in events
    assert [len(events[w.qids[n]]) for n in ("x", "y", "owner", "locked")] == [1, 1, 1, 1]


async def test_a_rush_of_locks_is_decided_in_fewer_transactions_than_locks(
    platform: Platform, rng: random.Random
) -> None:
    p = platform
    count = 12
    e: Eligibility = p.running["eligibility"].wiring.registrations[0][1].e
    run = f"lr-{rng.randrange(10**12)}"
    consumers = [(await p.person(rng))[1] for _ in range(count)]
    qids = [await p.claim(c, "phone") for c in consumers]
    batches = e.locks.commit.stats.batches
    answers = await asyncio.gather(
        *(
            p.eligibility.LockQualification(lock_request(q, f"{run}-{i}", c))
            for i, (q, c) in enumerate(zip(qids, consumers, strict=True))
        )
    )
    assert [(a.status, a.order_id) for a in answers] == [
        ("LOCKED", f"{run}-{i}") for i in range(count)
    ]
    assert e.locks.commit.stats.batches - batches < count
