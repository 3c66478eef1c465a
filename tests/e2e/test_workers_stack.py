"""The whole local stack with two worker processes per service (SUBSIDY_WORKERS=2), as a pod
sized for a rush runs it: a checkout goes through, the service's one /metrics is the sum over
its workers (served by the supervisor, prometheus_client's multiprocess mode), and every
supervisor stops cleanly."""

from __future__ import annotations

import asyncio
import io
import random
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from subsidy.v1 import ledger_pb2
from subsidyctl import demo
from subsidyctl.localstack import SERVICES, SIMULATOR, LocalStack, Ports, free_base

GET_BUDGET = "/subsidy.v1.LedgerService/GetBudget"


def answered(port: int, method: str) -> float:
    """Calls of ``method`` answered OK, as the service's /metrics reports them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if (
                sample.name == "subsidy_rpc_duration_seconds_count"
                and sample.labels.get("method") == method
                and sample.labels.get("code") == "OK"
            ):
                total += sample.value
    return total


async def _checkout_and_calls(stack: LocalStack, clients: int, calls: int) -> str:
    first = demo.Client(stack.endpoints())
    try:
        await demo.seed(first, random.Random(), {**demo.load_demo(), "consumers": 1})
        result = await demo.checkout(
            first,
            random.Random(),
            pool_id="pingshan-2025",
            sku="demo-fridge-g1",
            price_fen=1_200_000,
        )
    finally:
        await first.close()
    before = answered(stack.ports.metrics("ledger"), GET_BUDGET)
    # Each client is its own connection: the kernel spreads them over the two workers.
    many = [demo.Client(stack.endpoints()) for _ in range(clients)]
    try:
        request = ledger_pb2.GetBudgetRequest(pool_id="pingshan-2025")
        for _ in range(calls):
            await asyncio.gather(*(c.ledger.GetBudget(request) for c in many))
    finally:
        for c in many:
            await c.close()
    after = answered(stack.ports.metrics("ledger"), GET_BUDGET)
    assert after - before == clients * calls  # every worker's calls, none twice
    return str(result["status"])


@pytest.mark.slow
def test_two_workers_per_service_serve_a_checkout_and_one_summed_metrics(
    tmp_path: Path,
) -> None:
    stack = LocalStack(tmp_path / "run", Ports(free_base()), durable=False, log=io.StringIO())
    stack.workers = 2
    stack.start()
    try:
        status = asyncio.run(_checkout_and_calls(stack, clients=8, calls=5))
    finally:
        codes = stack.stop()
    assert status == "CAPTURED"
    assert codes == {s: 0 for s in (*SERVICES, SIMULATOR)}
