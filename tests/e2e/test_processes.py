"""The separate-process stack that `make run` and `make smoke` use."""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from subsidy.v1 import ledger_pb2
from subsidyctl import demo
from subsidyctl.localstack import SERVICES, AlreadyRunning, LocalStack, Ports, free_base


@pytest.mark.slow
def test_smoke_prints_one_json_line_and_exits_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "subsidyctl", "smoke"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[:3000]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert set(line) == {"subsidy_fen", "budget_available_fen", "audit_entries", "trace_spans"}
    assert line["subsidy_fen"] == 200_000  # grade-1 refrigerator at 12,000 yuan, capped
    assert line["budget_available_fen"] == 6_000_000_000 - 200_000
    assert line["audit_entries"] >= 15
    assert line["trace_spans"] >= 20


@pytest.mark.slow
def test_local_stack_keeps_data_and_keys_across_restart_and_refuses_a_second_up(
    tmp_path: Path,
) -> None:
    ports = Ports(free_base())
    quiet = io.StringIO()
    stack = LocalStack(tmp_path / "run", ports, durable=True, log=quiet)
    stack.start()
    try:
        with pytest.raises(AlreadyRunning, match="already running"):
            LocalStack(tmp_path / "run", ports, log=quiet).acquire()
        first = asyncio.run(_seed_and_checkout(stack))
    finally:
        stack.stop()
    again = LocalStack(tmp_path / "run", ports, durable=True, log=quiet)
    again.start()
    try:
        second = asyncio.run(_seed_and_checkout(again))
    finally:
        codes = again.stop()
    # SIGTERM drains and exits 0: no service had to be killed.
    assert codes == {s: 0 for s in (*SERVICES, "identity_sim")}
    for s in SERVICES:
        assert f"{s} stopped" in (tmp_path / "run" / "logs" / f"{s}.log").read_text()
    # The budget, the merchants and products, and the Vault keys all survived the restart:
    # the second checkout spends from what the first left, in the same pool.
    assert second["budget_available_fen"] == first["budget_available_fen"] - 200_000
    assert (tmp_path / "run" / "data" / "openbao" / "LOCAL-ONLY-unseal.json").exists()


async def _seed_and_checkout(stack: LocalStack) -> dict[str, int]:
    client = demo.Client(stack.endpoints())
    try:
        await demo.seed(client, random.Random(), {**demo.load_demo(), "consumers": 1})
        result = await demo.checkout(
            client,
            random.Random(),
            pool_id="pingshan-2025",
            sku="demo-fridge-g1",
            price_fen=1_200_000,
        )
        budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id="pingshan-2025"))
        return {"budget_available_fen": budget.available_fen, "subsidy_fen": result["subsidy_fen"]}
    finally:
        await client.close()
