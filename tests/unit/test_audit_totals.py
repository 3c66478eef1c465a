"""The auditor's rebuild of every total from events alone, its comparison with a service's
figures, and the positions :class:`LogAudit` names for a log that was tampered with."""

from __future__ import annotations

import datetime as dt

from google.protobuf.message import Message

from services.audit.totals import Difference, Rebuild, Table, compare
from services.audit.verify import LogAudit, Trusted
from services.kernel.contract import merkle
from services.kernel.contract.checkpoint import Checkpoint
from services.kernel.events import Context, Envelope, new_envelope, service_actor
from subsidy.v1 import events_pb2 as ev

LEDGER = Context(service_actor("ledger"))
ELIGIBILITY = Context(service_actor("eligibility"))


def env(service: str, stream: str, version: int, event: Message) -> Envelope:
    return new_envelope(
        service, stream, event, LEDGER if service == "ledger" else ELIGIBILITY, version=version
    )


def rebuilt(*envs: Envelope) -> dict[str, Table]:
    r = Rebuild()
    for e in envs:
        r.add(e)
    return {name: fold.table() for name, fold in r.finish().items()}


def test_a_pool_is_folded_in_stream_order_whatever_else_its_stream_holds() -> None:
    pool = "budget-pool/p"
    tables = rebuilt(
        env("ledger", pool, 3, ev.SubsidyReserved(order_id="o", pool_id="p", subsidy_fen=40)),
        env("ledger", pool, 1, ev.PoolAssigned(pool_id="p", platform_id="jd")),  # not money
        env("ledger", pool, 2, ev.BudgetFunded(pool_id="p", amount_fen=100)),
        env("ledger", pool, 4, ev.SubsidyCaptured(order_id="o", pool_id="p", subsidy_fen=40)),
    )
    assert tables["pool"] == {
        ("p",): {"funded_fen": 100, "available_fen": 60, "reserved_fen": 0, "spent_fen": 40}
    }


def test_quotas_persons_and_sales_are_what_the_events_say() -> None:
    due = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    claimed = ev.QualificationClaimed(
        qualification_id="q1", consumer_id="c1", category="phone", quota_day="2026-12-01"
    )
    claimed.expires_at.FromDatetime(due)
    other = ev.QualificationClaimed(
        qualification_id="q2", consumer_id="c1", category="phone", quota_day="2026-12-01"
    )

    def c1(version: int, event: Message) -> Envelope:
        return env("eligibility", "consumer/c1", version, event)

    def sale(version: int, event: Message) -> Envelope:  # not a pool's stream: no money here
        return env("ledger", "orders", version, event)

    tables = rebuilt(
        c1(1, ev.ConsumerRegistered(consumer_id="c1", id_number_index="bi-1")),
        c1(2, claimed),
        c1(4, ev.QualificationUsed(qualification_id="q1", order_id="o1")),  # arrived early
        c1(3, ev.QualificationLocked(qualification_id="q1", order_id="o1")),
        c1(5, other),
        c1(6, ev.QualificationExpired(qualification_id="q2")),
        # o1 captured, then refunded; o2 reserved only (not in the ledger of sales)
        sale(2, ev.SubsidyCaptured(order_id="o1", pool_id="p", subsidy_fen=45)),
        sale(1, ev.SubsidyReserved(
            order_id="o1", pool_id="p", sku="s", merchant_id="m", category="phone",
            unit_price_fen=300, subsidy_fen=45,
        )),
        sale(3, ev.SubsidyReleased(
            order_id="o1", pool_id="p", subsidy_fen=45, reason="REFUNDED", was_captured=True
        )),
        sale(4, ev.SubsidyReserved(
            order_id="o2", pool_id="p", sku="s", merchant_id="m", unit_price_fen=300, subsidy_fen=45
        )),
    )  # fmt: skip
    assert tables["quota"] == {("phone", "2026-12-01"): {"issued": 2}}
    assert tables["person"] == {("bi-1", "phone"): {"USED": 1, "EXPIRED": 1}}
    assert tables["sales"] == {
        ("m", "s"): {
            "sold_units": 1,
            "sales_fen": 300,
            "subsidy_fen": 45,
            "refunded_units": 1,
            "refunded_sales_fen": 300,
            "refunded_subsidy_fen": 45,
        }
    }


def test_every_differing_figure_and_every_key_on_one_side_is_a_difference() -> None:
    log: Table = {("a",): {"x": 1, "y": 2}, ("b",): {"x": 5}}
    live: Table = {("a",): {"x": 1, "y": 3}, ("c",): {"x": 7}}
    assert compare("t", log, live) == [
        Difference("t", ("a",), "y", 2, 3),
        Difference("t", ("b",), "x", 5, None),
        Difference("t", ("c",), "x", None, 7),
    ]
    assert compare("t", {("a",): {"x": 0}}, {("a",): {}}) == []  # a missing figure is 0
    assert (
        Difference("t", ("a", "b"), "y", 2, 3).describe()
        == "t a/b: y is 2 by the log, 3 by the service"
    )


# -- positions ---------------------------------------------------------------------------------
def entries(n: int) -> list[tuple[int, bytes, bytes, bytes]]:
    from services.audit.domain import GENESIS, chain_hash, leaf_hash

    rows, head = [], GENESIS
    for i in range(n):
        data = env("ledger", f"s/{i}", 1, ev.PoolAssigned(pool_id=f"p{i}")).SerializeToString()
        leaf = leaf_hash(data)
        head = chain_hash(head, leaf)
        rows.append((i, leaf, head, data))
    return rows


def checkpoint_of(rows: list[tuple[int, bytes, bytes, bytes]]) -> Checkpoint:
    return Checkpoint("o", len(rows), merkle.root_of(r[1] for r in rows))


def test_a_true_log_has_no_problem_and_gives_the_state_to_trust() -> None:
    rows = entries(13)
    audit = LogAudit()
    audit.add(rows)
    assert audit.check_checkpoint(checkpoint_of(rows)) == [] and audit.problems == []
    trusted = audit.trusted_state("note", checkpoint_of(rows))
    assert Trusted.from_json(trusted.as_json()) == trusted


def test_a_changed_a_missing_and_a_repeated_entry_are_named_where_they_are() -> None:
    rows = entries(10)
    cp = checkpoint_of(rows)
    changed = list(rows)
    i, leaf, chained, data = rows[4]
    changed[4] = (i, leaf, chained, data.replace(b"s/4", b"s/X"))  # still an envelope
    audit = LogAudit()
    audit.add(changed)
    assert [p.position for p in audit.problems] == [4]
    assert audit.check_checkpoint(cp)[0].message.startswith("the entries do not add up")
    gap = LogAudit()
    gap.add([*rows[:6], *rows[7:]])
    assert [(p.position, p.message) for p in gap.problems] == [
        (6, "audit entry 6 missing: the log goes from entry 5 to entry 7")
    ]
    assert gap.check_checkpoint(cp) == []  # named where the gap is, not again
    twice = LogAudit()
    twice.add([*rows[:3], rows[2], *rows[3:]])
    assert [p.position for p in twice.problems] == [2]
    short = LogAudit()
    short.add(rows[:8])
    (problem,) = short.check_checkpoint(cp)
    assert (problem.position, problem.message) == (
        8,
        "audit entries 8..9 missing: the log serves 8 of the 10 entries its checkpoint signs",
    )


def test_a_history_rewritten_before_the_trusted_size_is_located() -> None:
    rows = entries(21)
    first = LogAudit()
    first.add(rows[:13])
    trusted = first.trusted_state("note", checkpoint_of(rows[:13]))
    forked = list(rows)
    i, _, _, data = rows[9]
    from services.audit.domain import leaf_hash

    forked[9] = (i, leaf_hash(data + b"!"), b"", data + b"!")  # a consistent fork: leaf too
    audit = LogAudit(trusted_size=13)
    audit.add(forked)
    fork_cp = Checkpoint("o", 21, merkle.root_of(r[1] for r in forked))
    assert audit.check_checkpoint(fork_cp) == []
    problems = audit.check_trusted(trusted, fork_cp, proof=None)
    # 13 = 8 + 4 + 1: entry 9 lies in the block of entries 8..11.
    assert [(p.position, p.message) for p in problems][-1] == (
        8,
        "the first 13 entries are not those you trusted: they differ within entries 8..11",
    )
    truncated = LogAudit(trusted_size=13)
    truncated.add(rows[:11])
    (cut,) = truncated.check_trusted(trusted, checkpoint_of(rows[:11]), proof=[])
    assert (cut.position, cut.message) == (
        11,
        "the log has 11 entries, fewer than the 13 of your trusted checkpoint: it was "
        "truncated at entry 11",
    )
