"""The claim rush (bench/claim_rush.py) at smoke size: the whole stack as separate processes,
300 consumers claiming one category whose daily quota is 100, all at once; then two small
rates offered open loop, each with fresh consumers and a category of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import claim_rush


@pytest.mark.slow
async def test_a_rush_issues_exactly_the_quota_and_refuses_the_rest(tmp_path: Path) -> None:
    result = await claim_rush.run(
        consumers=300,
        quota=100,
        concurrency=64,
        prepare_concurrency=64,
        root=tmp_path,
        rates=(40, 80),
        rate_seconds=1.5,
    )
    # run() checks the database and the invariants itself (and raises); the callers agree too.
    assert (result["issued"], result["refused_quota"], result["refused_other"]) == (100, 200, {})
    assert result["claims_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"]
    # Each rate: R x S claims, a third of them issued (the rush's share, 100 of 300), the rest
    # refused on the quota and nothing else.
    rows = result["open_loop"]
    assert [(r["offered_per_s"], r["claims"], r["quota"]) for r in rows] == [
        (40, 60, 20),
        (80, 120, 40),
    ]
    for row in rows:
        assert row["issued"] == min(row["claims"], row["quota"])
        assert row["issued"] + row["refused_quota"] == row["claims"]
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["achieved_per_s"] > 0
        assert 0 <= row["late_starts"] <= row["claims"]
    best = result["open_loop_max_rate_within_p99_target"]
    assert best is None or best in (40, 80)
