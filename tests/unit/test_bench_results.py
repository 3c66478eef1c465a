"""`make bench`'s one result shape and one table (bench/common.py, bench/__main__.py), from the
result dicts the benchmarks return, without starting the stack; and one real quick run of the
cheapest benchmark (fraud: in memory) through the runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as runner
from bench.common import COMMON_KEYS, normalise, service_label, table, write_result


def row(name: str, per_s: float, p50: float = 1.0, p99: float = 2.0) -> dict[str, Any]:
    return {"name": name, "count": 10, "throughput_per_s": per_s, "p50_ms": p50, "p99_ms": p99}


CHECKOUT: dict[str, Any] = {
    "benchmark": "checkout",
    "orders": 400,
    "rows": [
        row("prepare: RegisterConsumer + ClaimQualification", 40.0),
        row("baseline: gRPC health check (ledger)", 2000.0),
        row("ReserveSubsidy (verify item, lock qualification, hold budget)", 60.0, 170.0, 900.0),
        row("CaptureSubsidy", 90.0),
    ],
    "cpu_ms_per_checkout": {"ledger": 9.0, "total": 30.0},
}
CLAIM_RUSH: dict[str, Any] = {
    "benchmark": "claim_rush",
    "claims_per_s": 635.0,
    "p50_ms": 151.0,
    "p99_ms": 711.0,
    "baseline": {"name": "gRPC health check (eligibility)", "throughput_per_s": 1563.2},
    "claims_vs_baseline": 0.406,
}
AUDIT: dict[str, Any] = {
    "verify_per_s": 58642.0,
    "targets": {"verify_per_s": 100000},
    "events": 1003001,
}
OVERLOAD: dict[str, Any] = {
    "capacity_per_s": 10.0,
    "rows": [
        {"name": "capacity: ReserveSubsidy closed-loop", "throughput_per_s": 10.0},
        {
            "name": "2x capacity",
            "admitted_per_s": 9.0,
            "admitted_p50_ms": 600.0,
            "admitted_p99_ms": 2400.0,
        },
    ],
}
FRAUD: dict[str, Any] = {
    "events": 63023,
    "detect_s": 1.46,
    "rows": [{"detector": "price_raise", "recall": 1.0}],
}
# A shape no extractor knows (a new benchmark's): a row and its peer.
PEER: dict[str, Any] = {
    "rows": [
        row("EventStore.append, 8 writers", 5000.0),
        row("peer: eventsourcing PostgreSQL recorder, 8 writers", 1000.0),
    ]
}


def test_every_result_gets_the_common_keys_first_and_keeps_its_own() -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("checkout", CHECKOUT),
        ("claim_rush", CLAIM_RUSH),
        ("audit", AUDIT),
        ("overload", OVERLOAD),
        ("fraud", FRAUD),
        ("newbench", PEER),
    ]
    for name, raw in cases:
        out = normalise(name, raw)
        assert tuple(out)[: len(COMMON_KEYS)] == COMMON_KEYS, name
        assert out["benchmark"] == name
        assert out["throughput_per_s"] is not None, name
        for key, value in raw.items():
            kept = key if key not in COMMON_KEYS or not isinstance(value, dict) else f"{key}_detail"
            if kept not in COMMON_KEYS:
                assert out[kept] == value, (name, key)


def test_headline_figures_and_ratios() -> None:
    checkout = normalise("checkout", CHECKOUT)
    # 60/s reserve then 90/s capture on the same orders: 36 checkouts/s
    assert checkout["throughput_per_s"] == 36.0
    assert (checkout["p50_ms"], checkout["p99_ms"]) == (170.0, 900.0)
    assert checkout["baseline_per_s"] == 2000.0
    assert checkout["ratio"] == 0.018
    rush = normalise("claim_rush", CLAIM_RUSH)
    assert rush["baseline"] == "gRPC health check (eligibility)"  # the name, not the row
    assert rush["baseline_detail"] == CLAIM_RUSH["baseline"]  # the row itself is kept
    assert (rush["throughput_per_s"], rush["baseline_per_s"], rush["ratio"]) == (
        635.0,
        1563.2,
        0.406,
    )
    assert normalise("audit", AUDIT)["ratio"] == 0.586
    assert normalise("audit", AUDIT)["p99_ms"] is None  # not measured: null, not zero
    over = normalise("overload", OVERLOAD)
    assert (over["throughput_per_s"], over["p99_ms"], over["ratio"]) == (9.0, 2400.0, 0.9)
    assert normalise("fraud", FRAUD)["throughput_per_s"] == round(63023 / 1.46, 1)
    peer = normalise("newbench", PEER)
    assert peer["operation"] == "EventStore.append, 8 writers"
    assert peer["baseline"] == "peer: eventsourcing PostgreSQL recorder, 8 writers"
    assert peer["ratio"] == 5.0


def test_normalising_twice_changes_nothing() -> None:
    for name, raw in [("checkout", CHECKOUT), ("claim_rush", CLAIM_RUSH), ("audit", AUDIT)]:
        once = normalise(name, raw)
        assert normalise(name, once) == once, name


def test_a_variant_is_read_as_the_benchmark_it_says_it_is() -> None:
    two = normalise("checkout-2workers", {**CHECKOUT, "workers_per_service": 2})
    assert two["benchmark"] == "checkout-2workers"
    assert two["throughput_per_s"] == 36.0 and two["workers_per_service"] == 2


def test_a_benchmark_own_common_keys_win() -> None:
    raw = {**PEER, "ratio": 4.2, "operation": "append"}
    out = normalise("eventstore", raw)
    assert (out["ratio"], out["operation"]) == (4.2, "append")


def test_write_result_is_one_json_object(tmp_path: Path) -> None:
    path = write_result("checkout", CHECKOUT, tmp_path)
    assert path == tmp_path / "checkout.json"
    loaded = json.loads(path.read_text())
    assert loaded == normalise("checkout", CHECKOUT)


def test_table_has_one_line_per_benchmark_and_dashes_for_missing() -> None:
    text = table([normalise("checkout", CHECKOUT), normalise("audit", AUDIT)])
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["checkout", "36.0"]
    assert "2,000.0" in lines[1] and "0.018" in lines[1]
    assert lines[2].split()[:4] == ["audit", "58,642.0", "-", "-"]


def test_service_labels_tell_workers_apart() -> None:
    assert service_label(["python", "-m", "services.ledger"]) == "ledger"
    assert service_label(["python", "-m", "services.ledger", "serve", "--worker", "1"]) == (
        "ledger[1]"
    )
    assert service_label(["python", "-m", "services.audit", "--workers-supervisor"]) == (
        "audit[supervisor]"
    )
    assert service_label(["postgres", "-D", "x"]) is None


def test_every_benchmark_is_registered_with_a_quick_size() -> None:
    names = [b.name for b in runner.BENCHMARKS]
    assert names[:9] == [
        "verify_item",
        "checkout",
        "checkout-2workers",
        "checkout-16pools",
        "checkout-8shards",
        "claim_rush",
        "audit",
        "overload",
        "fraud",
    ]
    assert "eventstore" in names  # registered by module, run when the module exists
    for b in runner.BENCHMARKS:
        if b.name != "eventstore":
            assert b.quick, b.name


def test_quick_fraud_through_the_runner_keeps_the_full_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench.fraud

    full = tmp_path / "fraud.json"
    full.write_text('{"kept": true}\n')
    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.fraud, "RESULTS", tmp_path)
    assert runner.main(["--quick", "--only", "fraud"]) == 0
    assert full.read_text() == '{"kept": true}\n'  # the full run's figures are untouched
    quick = json.loads((tmp_path / "quick" / "fraud.json").read_text())
    assert quick["benchmark"] == "fraud" and quick["honest_orders"] == 20000
    assert quick["throughput_per_s"] > 0
    assert all(r["recall"] == 1.0 for r in quick["rows"])
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith("fraud")


def test_the_event_store_headline_is_eight_writers_against_the_peer_at_eight() -> None:
    result = {
        "benchmark": "eventstore",
        "rows": [
            row("peer: eventsourcing, 1 writer(s)", 900.0),
            row("EventStore.append, 1 writer(s)", 700.0),
            row("peer: eventsourcing, 8 writer(s)", 750.0),
            row("EventStore.append, 8 writer(s)", 4500.0, 1.5, 3.0),
        ],
    }
    got = normalise("eventstore", result)
    assert (got["operation"], got["throughput_per_s"], got["p99_ms"]) == (
        "EventStore.append, 8 writer(s)",
        4500.0,
        3.0,
    )
    assert (got["baseline_per_s"], got["ratio"]) == (750.0, 6.0)
