"""The auditor's replay and cross-check: it accepts a true log and catches tampering,
overspending, and a log that disagrees with the services' stores."""

from __future__ import annotations

import hashlib

import pytest
from google.protobuf.message import Message

from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.verify import compare_pools, compare_with_stores, replay
from services.invariants import (
    EventDigest,
    InvariantViolation,
    LogStoreMismatch,
    check_log_matches_stores,
)
from services.kernel.contract.budget import Pool
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import events_pb2 as ev

CTX = Context(service_actor("ledger"))


def log_of(
    *events: ev.BudgetFunded | ev.SubsidyReserved | ev.SubsidyCaptured,
    versions: list[int] | None = None,
) -> list[tuple[int, bytes, bytes, bytes]]:
    """An audit log holding ``events`` in this arrival order, with these stream versions."""
    rows, head = [], GENESIS
    for i, e in enumerate(events):
        version = versions[i] if versions else i + 1
        data = new_envelope("ledger", "budget-pool/p", e, CTX, version=version).SerializeToString(
            deterministic=True
        )
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def history() -> list[tuple[int, bytes, bytes, bytes]]:
    return log_of(
        ev.BudgetFunded(pool_id="p", amount_fen=100_000),
        ev.SubsidyReserved(order_id="o1", pool_id="p", subsidy_fen=45_000),
        ev.SubsidyCaptured(order_id="o1", pool_id="p", subsidy_fen=45_000),
    )


def test_a_true_log_adds_up() -> None:
    rows = history()
    out = replay(rows)
    assert (out.size, out.head) == (3, rows[-1][2])
    assert out.pools == {"p": Pool("p", funded=100_000, available=55_000, reserved=0, spent=45_000)}
    compare_pools(out.pools, {"p": Pool("p", 100_000, 55_000, 0, 45_000)})


def test_a_changed_byte_breaks_the_chain() -> None:
    rows = history()
    idx, leaf, chained, data = rows[1]
    rows[1] = (idx, leaf, chained, data.replace(b"o1", b"o2"))
    with pytest.raises(InvariantViolation, match="entry 1"):
        replay(rows)


def test_a_removed_or_reordered_entry_is_caught() -> None:
    rows = history()
    with pytest.raises(InvariantViolation):
        replay([rows[0], rows[2]])
    with pytest.raises(InvariantViolation):
        replay([rows[1], rows[0], rows[2]])


def test_a_log_that_overspends_is_caught_even_with_a_valid_chain() -> None:
    rows = log_of(
        ev.BudgetFunded(pool_id="p", amount_fen=40_000),
        ev.SubsidyReserved(order_id="o1", pool_id="p", subsidy_fen=45_000),
    )
    with pytest.raises(InvariantViolation, match="negative"):
        replay(rows)


def test_a_ledger_that_disagrees_with_its_log_is_caught() -> None:
    out = replay(history())
    with pytest.raises(InvariantViolation, match="pool p"):
        compare_pools(out.pools, {"p": Pool("p", 100_000, 56_000, 0, 44_000)})


def test_events_that_reached_audit_out_of_order_replay_in_stream_order() -> None:
    """After a crash, a redelivered event lands in the log after later ones: the pool is still
    rebuilt in its stream's order."""
    rows = log_of(
        ev.BudgetFunded(pool_id="p", amount_fen=100_000),
        ev.SubsidyCaptured(order_id="o1", pool_id="p", subsidy_fen=45_000),  # version 3
        ev.SubsidyReserved(order_id="o1", pool_id="p", subsidy_fen=45_000),  # version 2
        versions=[1, 3, 2],
    )
    out = replay(rows)
    assert out.pools == {"p": Pool("p", funded=100_000, available=55_000, reserved=0, spent=45_000)}


def test_a_missing_version_of_a_pool_is_caught() -> None:
    rows = log_of(
        ev.BudgetFunded(pool_id="p", amount_fen=100_000),
        ev.SubsidyCaptured(order_id="o1", pool_id="p", subsidy_fen=45_000),
        versions=[1, 3],
    )
    with pytest.raises(InvariantViolation, match="missing"):
        replay(rows)


# -- the log against every store ------------------------------------------------------------


def chained(envelopes: list[bytes]) -> list[tuple[int, bytes, bytes, bytes]]:
    """A valid hash chain over these envelope bytes: what anyone who can write the audit
    database can produce, so the chain alone proves nothing about where an entry came from."""
    rows, head = [], GENESIS
    for i, data in enumerate(envelopes):
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def stored_event(service: str, stream: str, payload: Message, version: int) -> bytes:
    return new_envelope(
        service, stream, payload, Context(service_actor(service)), version=version
    ).SerializeToString(deterministic=True)


def digest(service: str, data: bytes) -> EventDigest:
    """What a service's EventLogService lists for an envelope its store holds."""
    env = Envelope.FromString(data)
    return EventDigest(
        service,
        env.event_id,
        hashlib.sha256(data).hexdigest(),
        env.stream_id,
        env.stream_version,
        env.event_type,
    )


def two_stores() -> tuple[list[bytes], list[bytes]]:
    ledger = [
        stored_event("ledger", "budget-pool/p", ev.BudgetFunded(amount_fen=n), n) for n in (1, 2, 3)
    ]
    catalog = [stored_event("catalog", "policy/x", ev.BudgetFunded(amount_fen=9), 1)]
    return ledger, catalog


def listed(ledger: list[bytes], catalog: list[bytes]) -> list[EventDigest]:
    return [*(digest("ledger", d) for d in ledger), *(digest("catalog", d) for d in catalog)]


def test_a_log_with_exactly_the_stores_events_passes() -> None:
    ledger, catalog = two_stores()
    rows = chained([ledger[0], catalog[0], ledger[2], ledger[1]])  # arrival order is free
    assert compare_with_stores(rows, listed(ledger, catalog)) == {"catalog": 1, "ledger": 3}


def test_an_entry_no_store_wrote_is_named_even_with_a_valid_chain() -> None:
    """The review's forgery: 8 ledger entries against 7 events in the ledger's store."""
    ledger, catalog = two_stores()
    forged = stored_event("ledger", "budget-pool/p", ev.BudgetFunded(amount_fen=7), 4)
    rows = chained([*ledger, *catalog, forged])
    replay(rows)  # the chain verifies: only the cross-check can tell
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(rows, listed(ledger, catalog))
    forged_id = Envelope.FromString(forged).event_id
    assert caught.value.counts == ["ledger: 4 entries in the audit log, 3 events in its store"]
    assert caught.value.events == [
        f"audit entry 4: event {forged_id} (ledger budget-pool/p v4 subsidy.v1.BudgetFunded)"
        " is in no service's store"
    ]
    assert not caught.value.only_unlogged


def test_a_stored_event_missing_from_the_log_is_named() -> None:
    ledger, catalog = two_stores()
    rows = chained([ledger[0], ledger[2], *catalog])
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(rows, listed(ledger, catalog))
    missing = Envelope.FromString(ledger[1]).event_id
    assert caught.value.events == [
        f"event {missing} (ledger budget-pool/p v2 subsidy.v1.BudgetFunded) is in ledger's"
        " store but not in the audit log"
    ]
    assert caught.value.counts == ["ledger: 2 entries in the audit log, 3 events in its store"]
    assert caught.value.only_unlogged  # what a log still catching up looks like


def test_an_entry_whose_bytes_differ_from_the_store_is_named() -> None:
    ledger, catalog = two_stores()
    changed = Envelope.FromString(ledger[1])
    changed.payload = ev.BudgetFunded(amount_fen=2_000_000).SerializeToString()
    changed_bytes = changed.SerializeToString(deterministic=True)
    rows = chained([ledger[0], changed_bytes, ledger[2], *catalog])  # rechained
    replay(rows)
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(rows, listed(ledger, catalog))
    (line,) = caught.value.events
    assert line.startswith(f"audit entry 1: event {changed.event_id} (ledger budget-pool/p v2")
    assert f"sha256 {hashlib.sha256(changed_bytes).hexdigest()} in the log" in line
    assert f"{hashlib.sha256(ledger[1]).hexdigest()} in the store" in line
    assert caught.value.counts == []  # the counts agree: only the hashes tell


def test_an_entry_that_names_another_service_or_appears_twice_is_named() -> None:
    ledger, catalog = two_stores()
    moved = Envelope.FromString(catalog[0])
    moved.service = "ledger"  # catalog's event, presented as the ledger's
    rows = chained([*ledger, moved.SerializeToString(deterministic=True), ledger[0]])
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(rows, listed(ledger, catalog))
    first = Envelope.FromString(ledger[0]).event_id
    assert caught.value.events == [
        f"audit entry 3: event {moved.event_id} (ledger policy/x v1 subsidy.v1.BudgetFunded)"
        " names ledger but is in catalog's store",
        f"event {first} is in the audit log 2 times (entries 0, 4)",
    ]
    assert caught.value.counts == [
        "catalog: 0 entries in the audit log, 1 events in its store",
        "ledger: 5 entries in the audit log, 3 events in its store",
    ]


def test_many_disagreements_are_capped_with_a_count() -> None:
    ledger = [stored_event("ledger", "s", ev.BudgetFunded(amount_fen=n), n) for n in range(1, 31)]
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(chained([]), [digest("ledger", d) for d in ledger])
    lines = str(caught.value).splitlines()
    assert lines[0] == "ledger: 0 entries in the audit log, 30 events in its store"
    assert len(caught.value.events) == 30 and len(caught.value.shown) == 20
    assert lines[1:21] == caught.value.shown and lines[21] == "... and 10 more"


def test_the_invariant_itself_takes_digests() -> None:
    """check_log_matches_stores: the function the verifier and the tests share."""
    a = EventDigest("ledger", "e1", "aa")
    assert check_log_matches_stores([a], [(0, a)]) == {"ledger": 1}
    with pytest.raises(LogStoreMismatch, match="e1"):
        check_log_matches_stores([a], [(0, a._replace(sha256_hex="bb"))])
    with pytest.raises(LogStoreMismatch, match="two stores"):
        check_log_matches_stores([a, a._replace(service="catalog")], [(0, a)])


def test_an_event_an_operator_skipped_at_the_outbox_is_accounted_for_by_its_skip() -> None:
    """A stored event the bus refused and an operator skipped was never published: the log
    holds the skip (itself a stored event) instead, and the cross-check accepts that; a skip
    of another service's event, or a skip no store wrote, accounts for nothing."""
    ledger, catalog = two_stores()
    stuck = Envelope.FromString(ledger[1]).event_id
    skip = stored_event("ledger", "outbox-skips", ev.OutboxEventSkipped(event_id=stuck), 1)
    store = [ledger[0], ledger[1], ledger[2], skip]
    rows = chained([ledger[0], ledger[2], skip, *catalog])
    assert compare_with_stores(rows, listed(store, catalog)) == {"catalog": 1, "ledger": 4}
    others = stored_event("catalog", "outbox-skips", ev.OutboxEventSkipped(event_id=stuck), 1)
    with pytest.raises(LogStoreMismatch, match=f"event {stuck} .* not in the audit log"):
        compare_with_stores(
            chained([ledger[0], ledger[2], others, *catalog]),
            listed([ledger[0], ledger[1], ledger[2]], [*catalog, others]),
        )
    with pytest.raises(LogStoreMismatch) as caught:
        compare_with_stores(rows, listed(ledger, catalog))  # the skip is in no store
    assert caught.value.events == [
        f"audit entry 2: event {Envelope.FromString(skip).event_id} (ledger outbox-skips v1"
        " subsidy.v1.OutboxEventSkipped) is in no service's store",
        f"event {stuck} (ledger budget-pool/p v2 subsidy.v1.BudgetFunded) is in ledger's store"
        " but not in the audit log",
    ]
