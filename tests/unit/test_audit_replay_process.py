"""The auditor's replay in a second process finds exactly what it finds in one: the same
problems at the same positions and in the same order, the same digests, events per service and
skipped events, and the same totals; and the packed page of GetEntries is checked as the
per-entry one."""

from __future__ import annotations

from typing import Any

import pytest

from bench.audit import Campaign
from services.audit.domain import GENESIS, chain_hash, leaf_hash
from services.audit.verify import LogAudit
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import Checkpoint
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import common_pb2
from subsidy.v1 import events_pb2 as ev

Row = tuple[int, bytes, bytes, bytes]


def log_of(envelopes: list[bytes]) -> list[Row]:
    """The entries of ``envelopes``, hashed and chained as the audit service does."""
    rows, head = [], GENESIS
    for i, data in enumerate(envelopes):
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def campaign_log(n: int) -> list[Row]:
    """``n`` entries of a campaign (pools, registrations, claims, locks, reservations,
    captures), hashed and chained as the audit service does."""
    return log_of(list(Campaign().events(n)))


def tampered(rows: list[Row]) -> list[Row]:
    """A capture whose actor is a person (30, chained anew: only its actor is off), a flipped
    byte (40), bytes that are no envelope (50, hashed as they are), entry 70 served twice,
    entries 80..82 missing, an outbox skip, and a pool event twice."""
    captured = Envelope.FromString(rows[30][3])
    captured.actor.CopyFrom(common_pb2.Actor(kind=common_pb2.Actor.KIND_OPERATOR, id="op-li"))
    by_hand = captured.SerializeToString(deterministic=True)
    out = log_of([*(r[3] for r in rows[:30]), by_hand, *(r[3] for r in rows[31:])])
    i, leaf, chained, data = out[40]
    out[40] = (i, leaf, chained, data[:-1] + bytes([data[-1] ^ 1]))
    junk = b"\xff\xff\xff"
    out[50] = (50, leaf_hash(junk), chain_hash(out[49][2], leaf_hash(junk)), junk)
    skip = new_envelope(
        "ledger",
        "outbox",
        ev.OutboxEventSkipped(event_id="e-skipped"),
        Context(service_actor("ledger")),
        version=1,
    ).SerializeToString(deterministic=True)
    out[60] = (60, leaf_hash(skip), chain_hash(out[59][2], leaf_hash(skip)), skip)
    out[90] = (90, out[90][1], out[90][2], out[4][3])  # a pool's first funding, logged twice
    return [*out[:71], out[70], *out[71:80], *out[83:]]


def outcome(rows: list[Row], *, parallel: bool, page: int = 32) -> dict[str, Any]:
    audit = LogAudit(5, watch=[3, 77], parallel=parallel)
    try:
        for start in range(0, len(rows), page):
            chunk = rows[start : start + page]
            audit.add_packed(
                [r[0] for r in chunk],
                b"".join(r[1] for r in chunk),
                b"".join(r[2] for r in chunk),
                [r[3] for r in chunk],
            )
        digests = list(audit.digests)  # as of a moment before the end (a sync)
        audit.add([])
        tables = {  # the violation, if any, is part of what is compared
            name: repr(table) if isinstance(table, Exception) else table
            for name, table in audit.finish().items()
        }
        return {
            "problems": [(p.check, p.position, p.message) for p in audit.problems],
            "digests": digests,
            "by_service": dict(audit.events_by_service),
            "skipped": audit.skipped,
            "tables": tables,
            "size": audit.size,
            "edge": audit.edge_at_trusted,
            "leaves": audit.leaves,
            "root": audit.tree.root(),
        }
    finally:
        audit.close()


@pytest.mark.parametrize("tamper", [False, True], ids=["true log", "tampered log"])
def test_the_second_process_finds_what_one_process_finds(tamper: bool) -> None:
    rows = campaign_log(240)
    if tamper:
        rows = tampered(rows)
    one, two = outcome(rows, parallel=False), outcome(rows, parallel=True)
    assert one == two
    if not tamper:
        assert one["problems"] == [] and one["size"] == 240
        assert one["root"] == merkle.root_of(r[1] for r in rows)
        assert one["tables"]["pool"] and one["tables"]["sales"]
        return
    check, position, message = one["problems"][0]  # the capture whose actor is a person
    assert (check, position) == ("actor", 30)
    assert "subsidy.v1.SubsidyCaptured is caused by platforms and services only" in message
    assert "actor kind operator" in message and "op-li" not in message
    messages = [(position, message) for _, position, message in one["problems"]]
    assert messages[1][0] == 40 and "its bytes hash to leaf" in messages[1][1]
    assert (50, "audit entry 50 is not an event envelope") in messages
    assert (70, "audit entry 70 is served twice or out of order") in messages
    assert (80, "audit entries 80..82 missing: the log goes from entry 79 to entry 83") in messages
    assert [m[0] for m in messages] == sorted(m[0] for m in messages)  # in log order
    assert one["skipped"] == {"e-skipped": ("ledger", one["skipped"]["e-skipped"][1])}
    assert "logged twice" in one["tables"]["pool"]


def test_a_packed_page_whose_columns_disagree_is_a_problem_not_a_crash() -> None:
    rows = campaign_log(10)
    audit = LogAudit()
    audit.add_packed(
        [r[0] for r in rows], b"".join(r[1] for r in rows), b"short", [r[3] for r in rows]
    )
    cp = Checkpoint("o", 10, merkle.root_of(r[1] for r in rows))
    assert [(p.position, p.message) for p in audit.problems] == [
        (
            0,
            "a page of entries from 0 whose columns differ in length: 10 indexes, 10 "
            "envelopes, 320 and 5 bytes of hashes",
        )
    ]
    assert audit.check_checkpoint(cp)[0].message.startswith("audit entries 0..9 missing")
