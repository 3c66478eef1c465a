"""The auditor's replay: it accepts a true log and catches tampering and overspending."""

from __future__ import annotations

import pytest

from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.verify import compare_pools, replay
from services.contract.budget import Pool
from services.invariants import InvariantViolation
from services.kernel.events import Context, new_envelope, service_actor
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
