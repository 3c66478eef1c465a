"""The claim rush (bench/claim_rush.py) at smoke size: the whole stack as separate processes,
300 consumers claiming one category whose daily quota is 100, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import claim_rush


@pytest.mark.slow
async def test_a_rush_issues_exactly_the_quota_and_refuses_the_rest(tmp_path: Path) -> None:
    result = await claim_rush.run(
        consumers=300, quota=100, concurrency=64, prepare_concurrency=64, root=tmp_path
    )
    # run() checks the database and the invariants itself (and raises); the callers agree too.
    assert (result["issued"], result["refused_quota"], result["refused_other"]) == (100, 200, {})
    assert result["claims_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"]
