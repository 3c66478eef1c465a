"""Dead letters listed, shown and replayed (services/kernel/deadletters.py), against a real
PostgreSQL and JetStream: a replay after the cause is fixed handles the event once, records
who replayed it and why, and a second replay changes nothing."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.js import JetStreamContext

from services.kernel import bus
from services.kernel.consumer import EventConsumer
from services.kernel.deadletters import (
    ALREADY_HANDLED,
    HANDLED,
    NOT_REPLAYABLE,
    STILL_FAILING,
    DeadLetters,
    replay_stream,
)
from services.kernel.errors import InvalidArgument, NotFound
from services.kernel.events import Context, Envelope
from services.kernel.eventstore import EventStore, Tx
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev
from tests.kernel.test_bus import fill

OPERATOR = Context(
    common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="ops-1", reason="handler fixed")
)


async def dead_letter_one(
    store: EventStore,
    js: JetStreamContext,
    service: str,
    fixed: asyncio.Event,
) -> tuple[EventConsumer, list[str], list[str]]:
    """Two events of ``service``; the consumer refuses the first until ``fixed`` is set, and
    dead-letters it. Returns the consumer, the event ids and the handler's effects."""
    ids = await fill(store, service, 2)
    await bus.OutboxRelay(store, js).publish_pending()
    effects: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        if env.event_id == ids[0] and not fixed.is_set():
            raise ValueError("a bug in the handler")
        effects.append(env.event_id)

    consumer = EventConsumer(
        f"c-{service}", [f"events.{service}.>"], handler, max_deliver=2, _backoff=(0.05,)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(store, js, stop))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if consumer.dead_lettered and consumer.handled:
            break
    stop.set()
    await task
    assert consumer.dead_lettered == 1 and effects == [ids[1]]
    return consumer, ids, effects


async def test_a_fixed_dead_letter_is_replayed_once_and_recorded(
    store: EventStore,
    js: JetStreamContext,
) -> None:
    service = f"dl{uuid.uuid4().hex[:8]}"
    fixed = asyncio.Event()
    consumer, ids, effects = await dead_letter_one(store, js, service, fixed)
    letters = DeadLetters(store, js, "ledger", [consumer])

    [letter] = await letters.list()
    assert letter.consumer == consumer.name and letter.reason == "ValueError"
    assert letter.envelope is not None and letter.envelope.event_id == ids[0]
    shown = await letters.describe(await letters.get(letter.sequence))
    assert (shown.event_id, shown.consumer, shown.producer) == (ids[0], consumer.name, service)
    assert shown.original_subject.startswith(f"events.{service}.")
    assert shown.dead_lettered_at.seconds > 0 and not shown.handled
    assert not shown.HasField("occurred_at") or shown.occurred_at.seconds > 0
    assert "payload" not in {f.name for f in shown.DESCRIPTOR.fields}  # metadata only

    # Not fixed yet: still failing, and nothing is recorded.
    before = await store.count()
    assert (await letters.replay(letter, OPERATOR)).outcome == STILL_FAILING
    assert await store.count() == before and effects == [ids[1]]

    fixed.set()
    outcome = await letters.replay(letter, OPERATOR)
    assert (outcome.outcome, outcome.event_id) == (HANDLED, ids[0])
    assert effects == [ids[1], ids[0]]
    [record] = await store.read_stream(replay_stream(consumer.name, ids[0]))
    replayed = ev.DeadLetterReplayed.FromString(record.payload)
    assert (replayed.event_id, replayed.consumer, replayed.reason) == (
        ids[0],
        consumer.name,
        "handler fixed",
    )
    assert replayed.dead_letter_sequence == letter.sequence
    assert record.actor.kind == common_pb2.Actor.KIND_OPERATOR and record.actor.id == "ops-1"
    assert (await letters.describe(letter)).handled

    # Twice: nothing changes.
    after = await store.count()
    assert (await letters.replay(letter, OPERATOR)).outcome == ALREADY_HANDLED
    assert await store.count() == after and effects == [ids[1], ids[0]]


async def test_only_the_services_own_consumers_letters_are_listed_and_forged_stay_refused(
    store: EventStore,
    js: JetStreamContext,
) -> None:
    service = f"dl{uuid.uuid4().hex[:8]}"
    consumer, _, _ = await dead_letter_one(store, js, service, asyncio.Event())
    mine = DeadLetters(store, js, "ledger", [consumer])
    neighbour = EventConsumer(f"c-{service}-other", [f"events.{service}.>"], consumer.handler)
    other = DeadLetters(store, js, "catalog", [neighbour])
    [letter] = await mine.list(consumer.name)
    assert await other.list() == []  # another service's consumer: not its letters
    with pytest.raises(NotFound):
        await other.get(letter.sequence)
    with pytest.raises(InvalidArgument):
        await other.list(consumer.name)
    # Sequences from the request are bounded before they reach NATS.
    for sequence in (0, 2**62):
        with pytest.raises(NotFound):
            await mine.get(sequence)
    with pytest.raises(InvalidArgument):
        await mine.get(2**64 - 1)
    with pytest.raises(InvalidArgument):
        await mine.list(after=2**64 - 2)
    assert await mine.list(after=2**62) == []
    # A letter that is not its owner's event (a forged one) is never handed over.
    forged = await mine.get(letter.sequence)
    forged = type(forged)(
        forged.sequence,
        forged.consumer,
        forged.reason,
        "events.someoneelse.BudgetFunded",
        forged.at,
        forged.envelope,
    )
    assert (await mine.replay(forged, OPERATOR)).outcome == NOT_REPLAYABLE
