"""The events only platforms and services cause (services.kernel.events.MACHINE_EVENTS): the
store refuses one whose actor is a person, since audit's record of what persons do does not
subscribe to them; every other event of the contract reaches that record."""

from __future__ import annotations

import pytest

from services.audit import cases
from services.invariants import InvariantViolation
from services.kernel import topology
from services.kernel.events import (
    MACHINE_EVENTS,
    PERSON_KINDS,
    Context,
    new_envelope,
    service_actor,
)
from services.kernel.eventstore import EventStore
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

CAPTURED = ev.SubsidyCaptured(order_id="o-1", pool_id="p-1", subsidy_fen=100)


@pytest.mark.parametrize("kind", sorted(PERSON_KINDS))
async def test_a_person_is_never_the_actor_of_a_machine_event(
    store: EventStore, kind: common_pb2.Actor.Kind.ValueType
) -> None:
    person = Context(common_pb2.Actor(kind=kind, id="op-li"))
    with pytest.raises(InvariantViolation):
        await store.append("order/o-1", 0, [new_envelope("ledger", "order/o-1", CAPTURED, person)])
    assert await store.read_all() == []  # nothing committed
    platform = Context(common_pb2.Actor(kind=common_pb2.Actor.KIND_PLATFORM, id="jd"))
    await store.append("order/o-1", 0, [new_envelope("ledger", "order/o-1", CAPTURED, platform)])
    # Another service's event of that name is not the ledger's capture: a person may cause it.
    other = new_envelope("catalog", "x/1", CAPTURED, person)
    await store.append("x/1", 0, [other])
    await store.append(
        "order/o-2", 0, [new_envelope("ledger", "order/o-2", ev.SubsidyReserved(), person)]
    )
    assert len(await store.read_all()) == 3


def test_supervision_subscribes_to_every_event_but_the_machine_ones() -> None:
    subjects = cases.supervised_subjects()
    assert len(subjects) == len(set(subjects))
    for service in topology.SERVICE_NAMES:
        machine = MACHINE_EVENTS.get(service, frozenset())
        for m in ev.DESCRIPTOR.message_types_by_name.values():
            if m.name == "EventEnvelope":
                continue
            subject = f"events.{service}.{m.name}"
            covered = subject in subjects or f"events.{service}.>" in subjects
            assert covered == (m.full_name not in machine), subject
    # What the supervision decodes and acts on is never left out.
    every_machine = set().union(*MACHINE_EVENTS.values())
    assert not cases._DECODED & every_machine
    assert service_actor("ledger").kind not in PERSON_KINDS
