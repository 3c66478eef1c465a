"""The short chaos run CI does: a few injections of each kind (kill -9, SIGSTOP pause, a
PostgreSQL outage) covering every process of the stack (the four services, the identity
simulator, each node of a three-node NATS cluster, PostgreSQL, OpenBao) under a checkout load;
afterwards every invariant holds (tests/chaos/engine.py; `make chaos` runs 100 or more)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from subsidyctl.localstack import LocalStack
from tests.chaos import engine

SEED = 1915
# One injection per process and the outage: every target, every kind.
INJECTIONS = len(engine.targets(3)) + 1
PLAN = engine.short_plan(SEED)
SHORT = engine.Timing(pause_s=(0.5, 1.0), outage_s=(1.5, 2.5), gap_s=(0.2, 0.5))


def test_the_first_round_of_a_plan_hits_every_process_and_kind() -> None:
    first = engine.plan(SEED, INJECTIONS)
    assert {t for _, t in first} == set(engine.targets(3))
    assert {k for k, _ in first} == set(engine.KINDS)
    assert engine.plan(SEED, 120) == engine.plan(SEED, 120)  # a seed replays its plan
    assert engine.plan(SEED, 120)[:INJECTIONS] == first
    assert set(engine.plan(SEED, 400)) == set(engine.pairs(3))
    assert len(PLAN) == INJECTIONS
    assert {t for _, t in PLAN} == set(engine.targets(3))
    assert {k for k, _ in PLAN} == set(engine.KINDS)


def test_a_report_is_written_as_json(tmp_path: Path) -> None:
    report = engine.ChaosReport(seed=SEED, planned=1, nats_nodes=3)
    report.injections.append(engine.Injection(1, engine.PAUSE, "ledger", 1.0, 0.5, 0.7, 2))
    report.refused["reserve: ORDER_REFUSED"] += 1
    report.retries["UNAVAILABLE"] += 3
    report.invariants["no dead letter"] = "ok"
    report.write(tmp_path / "chaos.json")
    written = json.loads((tmp_path / "chaos.json").read_text())
    assert written["retries"] == {"UNAVAILABLE": 3} and written["ok"] is True
    assert written["by_target"] == {"ledger": {"kill": 0, "pause": 1, "outage": 0}}
    assert written["replay"] == f"make chaos SUBSIDY_CHAOS_SEED={SEED}"
    assert "ledger" in report.table()


@pytest.mark.slow
def test_a_short_chaos_run_over_every_process_breaks_no_invariant(
    chaos_stack: LocalStack,
) -> None:
    log = io.StringIO()
    chaos = engine.Chaos(
        chaos_stack,
        SEED,
        INJECTIONS,
        timing=SHORT,
        say=lambda line: print(line, file=log),
        chosen=PLAN,
    )
    report = asyncio.run(chaos.run())
    print(report.table())
    assert len(report.injections) == INJECTIONS, report.table()
    assert {i.target for i in report.injections} == set(engine.targets(3))
    assert {i.kind for i in report.injections} == set(engine.KINDS)
    assert report.orders_completed >= 5, report.table()  # the traffic really flowed
    assert sum(report.retries.values()) > 0, "no call met a fault"
    assert report.invariants and all(v == "ok" for v in report.invariants.values()), report.table()
    assert report.failures == [], report.table()
    # the supervisor restarted each infrastructure process the plan killed
    killed = {i.target for i in report.injections if i.kind == engine.KILL}
    for part, restarts in report.supervisor_restarts.items():
        assert restarts >= (part in killed), (part, report.supervisor_restarts)
    assert report.ok
