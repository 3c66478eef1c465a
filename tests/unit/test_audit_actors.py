"""The auditor checks every replayed event as the store checks it at append
(services.invariants.check_machine_event, through services.kernel.events.check_actor): an event
only platforms and services cause is never a person's. One in the log was written around the
store; it is named at its position, with its event and its actor's kind, never the actor's id."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.verify import LogAudit, replay
from services.invariants import InvariantViolation
from services.kernel.events import (
    MACHINE_EVENTS,
    PERSON_KINDS,
    Context,
    Envelope,
    new_envelope,
    service_actor,
)
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

Row = tuple[int, bytes, bytes, bytes]
Kind = common_pb2.Actor.Kind
PLATFORM = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd"))


def person(kind: Kind.ValueType) -> Context:
    return Context(common_pb2.Actor(kind=kind, id="op-li"))


def payload_of(event_type: str) -> Message:
    """An empty payload of one of the contract's events, by its full name."""
    message: type[Message] = getattr(ev, event_type.rsplit(".", 1)[-1])
    return message()


def chained(*envelopes: Envelope) -> list[Row]:
    """A log of ``envelopes``, hashed and chained as the audit service does."""
    rows, head = [], GENESIS
    for i, env in enumerate(envelopes):
        data = env.SerializeToString(deterministic=True)
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def problems(rows: list[Row]) -> list[tuple[str, int | None, str]]:
    audit = LogAudit()
    try:
        audit.add(rows)
        return [(p.check, p.position, p.message) for p in audit.problems]
    finally:
        audit.close()


MACHINE = sorted((s, t) for s, types in MACHINE_EVENTS.items() for t in types)


@pytest.mark.parametrize("kind", sorted(PERSON_KINDS), ids=Kind.Name)
@pytest.mark.parametrize(("service", "event_type"), MACHINE, ids=[t for _, t in MACHINE])
def test_a_person_is_never_the_actor_of_a_machine_event_in_the_log_either(
    service: str, event_type: str, kind: Kind.ValueType
) -> None:
    by_platform = new_envelope(service, "s/1", payload_of(event_type), PLATFORM, version=1)
    by_service = new_envelope(
        service, "s/2", payload_of(event_type), Context(service_actor(service)), version=1
    )
    by_person = new_envelope(service, "s/3", payload_of(event_type), person(kind), version=1)
    rows = chained(by_platform, by_service, by_person)

    found = problems(rows)

    described = f"{by_person.event_id} ({service} s/3 v1 {event_type})"
    role = Kind.Name(kind).removeprefix("KIND_").lower()
    assert found == [
        (
            "actor",
            2,
            f"audit entry 2: event {described}: {event_type} is caused by platforms and services"
            f" only, yet a person is its actor (actor kind {role}); the store refuses such an"
            " event at append, so it was written around the store",
        )
    ]
    assert "op-li" not in found[0][2]  # the kind, never who
    with pytest.raises(InvariantViolation) as caught:
        replay(rows)
    assert str(caught.value) == found[0][2]
    assert problems(rows[:2]) == [] and replay(rows[:2]).size == 2


@pytest.mark.parametrize("kind", sorted(PERSON_KINDS), ids=Kind.Name)
def test_a_person_may_cause_every_other_event(kind: Kind.ValueType) -> None:
    reserved = new_envelope("ledger", "order/o-1", ev.SubsidyReserved(), person(kind), version=1)
    # Another service's event of a machine event's name is not that service's machine event.
    foreign = new_envelope("catalog", "x/1", ev.SubsidyCaptured(), person(kind), version=1)
    rows = chained(reserved, foreign)
    assert problems(rows) == []
    assert replay(rows).size == 2
