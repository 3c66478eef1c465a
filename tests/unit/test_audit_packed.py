"""A page of GetEntries' packed answer is checked whole when every entry in it is in place
(:meth:`LogAudit.add_packed`); whatever it holds, it must find exactly what the entry-by-entry
check (:meth:`LogAudit.add`) finds, in the same state."""

from __future__ import annotations

from typing import Any

import pytest

from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.verify import LogAudit, Row
from services.kernel.events import Context, new_envelope, service_actor
from subsidy.v1 import events_pb2 as ev

LEDGER = Context(service_actor("ledger"))
PAGE = 7


def entries(n: int) -> list[Row]:
    rows: list[Row] = []
    head = GENESIS
    for i in range(n):
        data = new_envelope(
            "ledger", f"s/{i}", ev.PoolAssigned(pool_id=f"p{i}"), LEDGER, version=1
        ).SerializeToString()
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def state(audit: LogAudit) -> dict[str, Any]:
    return {
        "problems": [(p.check, p.position, p.message) for p in audit.problems],
        "size": audit.size,
        "head": audit.head,
        "tree": (audit.tree.size, list(audit.tree.hashes)),
        "reported": audit.reported.root() if audit.size and not audit.broken else None,
        "broken": audit.broken,
        "leaves": audit.leaves,
        "edge_at_trusted": audit.edge_at_trusted,
        "events": dict(audit.events_by_service),
        "digests": [(i, d.event_id) for i, d in audit.digests],
    }


def both(rows: list[Row], trusted_size: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state after the rows entry by entry, and after them as packed pages of PAGE."""
    watch = {0, 5, 9, 20}
    one = LogAudit(trusted_size, watch)
    one.add(rows)
    packed = LogAudit(trusted_size, watch)
    for at in range(0, len(rows), PAGE):
        page = rows[at : at + PAGE]
        packed.add_packed(
            [r[0] for r in page],
            b"".join(r[1] for r in page),
            b"".join(r[2] for r in page),
            [r[3] for r in page],
        )
    return state(one), state(packed)


@pytest.mark.parametrize("trusted_size", [0, 3, 7, 14, 16, 30])
def test_a_true_log_in_pages_is_the_log_entry_by_entry(trusted_size: int) -> None:
    one, packed = both(entries(30), trusted_size)
    assert packed == one
    assert one["problems"] == [] and one["size"] == 30


def tampered(kind: str) -> list[Row]:
    rows = entries(30)
    i, leaf, chained, data = rows[10]
    if kind == "bytes":
        rows[10] = (i, leaf, chained, data.replace(b"s/10", b"s/XX"))
    elif kind == "leaf":
        rows[10] = (i, leaf_hash(b"other"), chained, data)
    elif kind == "chain":
        rows[10] = (i, leaf, chain_hash(GENESIS, leaf), data)
    elif kind == "not an envelope":
        bad = b"\xff\xff\xff"
        rows[10] = (i, leaf_hash(bad), chain_hash(rows[9][2], leaf_hash(bad)), bad)
    elif kind == "gap":
        del rows[10]
    elif kind == "twice":
        rows.insert(10, rows[9])
    elif kind == "swapped":
        rows[10], rows[11] = rows[11], rows[10]
    return rows


@pytest.mark.parametrize(
    "kind", ["bytes", "leaf", "chain", "not an envelope", "gap", "twice", "swapped"]
)
def test_a_tampered_page_is_named_as_entry_by_entry(kind: str) -> None:
    one, packed = both(tampered(kind), trusted_size=14)
    assert packed == one
    assert one["problems"], kind  # and it was found
