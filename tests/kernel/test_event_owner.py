"""A consumer accepts an event only from its owner: the subject, the envelope and the id agree.

The review published a forged ``events.ledger.ReservationRefused`` that unlocked a pending
order's qualification. NATS credentials stop an outsider from publishing on the ledger's
subjects; this check is the consumer's own: an envelope that names another service than its
subject, another type, or an id the owner's store could not have minted is dead-lettered with
its reason, counted in a metric, and changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid

from nats.js import JetStreamContext
from sqlalchemy import text

from services.kernel import metrics
from services.kernel.consumer import (
    FOREIGN_ID,
    PERSON_ACTOR,
    WRONG_PUBLISHER,
    WRONG_SUBJECT,
    EventConsumer,
    refusal,
)
from services.kernel.events import (
    Actor,
    Context,
    Envelope,
    belongs_to,
    event_id_for,
    new_envelope,
    service_actor,
)
from services.kernel.eventstore import EventStore, Tx
from subsidy.v1 import events_pb2 as ev

CTX = Context(service_actor("ledger"))


def refused(service: str, qualification: str = "q-1") -> Envelope:
    return new_envelope(
        service,
        "refusal/o-1",
        ev.ReservationRefused(order_id="o-1", qualification_id=qualification, reason="X"),
        CTX,
    )


def test_each_store_mints_ids_only_it_would() -> None:
    ledger_id = event_id_for("ledger")
    assert belongs_to(ledger_id, "ledger")
    assert not belongs_to(ledger_id, "eligibility")
    assert uuid.UUID(ledger_id).version == 7
    assert not belongs_to(str(uuid.uuid4()), "ledger")
    assert not belongs_to("not-an-id", "ledger")


def test_the_subject_the_envelope_and_the_id_must_agree() -> None:
    good = refused("ledger")
    assert refusal("events.ledger.ReservationRefused", good) is None
    assert refusal("events.catalog.ReservationRefused", good) == WRONG_PUBLISHER
    assert refusal("events.ledger.SubsidyCaptured", good) == WRONG_SUBJECT
    forged = refused("ledger")
    forged.event_id = event_id_for("eligibility")  # minted by another store
    assert refusal("events.ledger.ReservationRefused", forged) == FOREIGN_ID
    impostor = refused("eligibility")  # an honest eligibility envelope, on the ledger's subject
    assert refusal("events.ledger.ReservationRefused", impostor) == WRONG_PUBLISHER


def test_a_machine_event_with_a_person_as_its_actor_is_refused() -> None:
    """What the owner's store refuses at append (services.kernel.events.check_actor) a consumer
    refuses too: a capture is a platform's, never an operator's."""
    capture = ev.SubsidyCaptured(order_id="o-1", qualification_id="q-1")
    by_service = new_envelope("ledger", "reservation/o-1", capture, CTX)
    assert refusal("events.ledger.SubsidyCaptured", by_service) is None
    by_operator = new_envelope(
        "ledger",
        "reservation/o-1",
        capture,
        Context(Actor(kind=Actor.KIND_OPERATOR, id="op-1")),
    )
    assert refusal("events.ledger.SubsidyCaptured", by_operator) == PERSON_ACTOR
    # A person may be the actor of an event that is not only a machine's.
    refusal_by_operator = refused("ledger")
    refusal_by_operator.actor.CopyFrom(Actor(kind=Actor.KIND_OPERATOR, id="op-1"))
    assert refusal("events.ledger.ReservationRefused", refusal_by_operator) is None


async def test_a_forged_event_on_a_real_stream_is_dead_lettered_and_changes_nothing(
    store: EventStore, js: JetStreamContext
) -> None:
    forged = refused("ledger", qualification=f"q-{uuid.uuid4().hex[:8]}")
    forged.event_id = str(uuid.uuid4())  # what a forger who does not know the scheme sends
    honest = refused("ledger", qualification=forged.payload.hex()[:8])
    subject = "events.ledger.ReservationRefused"
    await js.publish(subject, forged.SerializeToString(deterministic=True))
    await js.publish(subject, honest.SerializeToString(deterministic=True))
    seen: list[str] = []

    async def handler(tx: Tx, env: Envelope) -> None:
        seen.append(env.event_id)

    name = f"owner-{uuid.uuid4().hex[:8]}"
    before = metrics.EVENTS_REFUSED.labels(name, FOREIGN_ID)._value.get()
    consumer = EventConsumer(name, [subject], handler)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(store, js, stop))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if honest.event_id in seen and consumer.dead_lettered >= 1:
                break
    finally:
        stop.set()
        await task
    assert forged.event_id not in seen and honest.event_id in seen
    assert consumer.dead_lettered == 1
    assert metrics.EVENTS_REFUSED.labels(name, FOREIGN_ID)._value.get() == before + 1
    sub = await js.subscribe(f"dlq.{name}", ordered_consumer=True)
    msg = await sub.next_msg(timeout=5)
    await sub.unsubscribe()
    assert msg.data == forged.SerializeToString(deterministic=True)
    assert msg.headers is not None and msg.headers["Subsidy-Error"] == FOREIGN_ID
    async with store.engine.connect() as conn:  # not even marked handled
        marked = await conn.scalar(
            text("SELECT count(*) FROM handled_events WHERE event_id = :e"),
            {"e": forged.event_id},
        )
    assert marked == 0
