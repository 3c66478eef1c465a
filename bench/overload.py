"""Benchmark: the checkout at about once and twice its capacity, with the admission bound.

The stack `make run` starts (each service its own process; real PostgreSQL, NATS, OpenBao) with
the admission bound (``SUBSIDY_MAX_CONCURRENT_WRITES``, ``--limit``, default 32; the services
ship with no bound) and
the per-client rate limits lifted (the bench is one client; the bound under test is the
process's, not a client's). First the capacity: ReserveSubsidy closed-loop at the bound's
concurrency, orders per second. Then an open-loop load (arrivals at a fixed rate whatever the
answers, as a checkout rush is) at 1x and 2x that capacity for ``--seconds`` each: every arrival
reserves a new order and is either admitted (its latency: p50/p99) or refused with
``RESOURCE_EXHAUSTED`` reason ``OVERLOADED`` (counted, with the refusal's latency); anything
else (a deadline) is counted as a failure. Afterwards every admitted order is captured and the
pool must show exactly the admitted orders spent and nothing held: a refused order changed
nothing. ``--unbounded`` runs the 2x load once more on a stack without the bound (``0``), to
show what the bound prevents. Usage: python -m bench.overload [--seconds S] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from bench.checkout import campaign, person, reserve_request
from bench.common import RESULTS, timed
from services.kernel import rpc
from subsidy.v1 import ledger_pb2
from subsidyctl import demo
from subsidyctl.localstack import LocalStack, Ports, free_base

UNLIMITED = "1000000/second"
RATES = {
    "SUBSIDY_RATE_CLAIMS": UNLIMITED,
    "SUBSIDY_RATE_REGISTRATION": UNLIMITED,
    "SUBSIDY_RATE_CHECKOUT": UNLIMITED,
}
SUBSIDY_FEN = 45_000  # the bench phone's subsidy (bench/checkout.py's campaign)


def ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)


@dataclass
class Phase:
    """The answers of one open-loop phase."""

    name: str
    rate_per_s: float
    seconds: float
    admitted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    admitted_orders: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offered_per_s": round(self.rate_per_s, 1),
            "arrivals": len(self.admitted) + len(self.refused) + sum(self.failed.values()),
            "admitted": len(self.admitted),
            "admitted_per_s": round(len(self.admitted) / self.seconds, 1),
            "admitted_p50_ms": ms(self.admitted, 0.5),
            "admitted_p99_ms": ms(self.admitted, 0.99),
            "refused": len(self.refused),
            "refusal_p50_ms": ms(self.refused, 0.5),
            "refusal_p99_ms": ms(self.refused, 0.99),
            "failed": dict(self.failed),
        }


async def open_loop(
    client: demo.Client,
    phase: Phase,
    people: list[tuple[str, str]],
    prefix: str,
) -> Phase:
    """Arrivals every 1/rate s for ``phase.seconds``, each a new order, whatever the answers."""
    count = int(phase.rate_per_s * phase.seconds)
    assert count <= len(people), "not enough prepared consumers"
    tasks: list[asyncio.Task[None]] = []

    async def arrive(i: int) -> None:
        order_id = f"{prefix}-{i}"
        started = time.perf_counter()
        try:
            await client.ledger.ReserveSubsidy(reserve_request(client, order_id, people[i]))
        except grpc.aio.AioRpcError as err:
            took = time.perf_counter() - started
            info = rpc.error_info(err)
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info is not None:
                if info.reason == "OVERLOADED":
                    phase.refused.append(took)
                    return
            key = f"{err.code().name}/{info.reason if info else ''}"
            phase.failed[key] = phase.failed.get(key, 0) + 1
            return
        phase.admitted.append(time.perf_counter() - started)
        phase.admitted_orders.append(order_id)

    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / phase.rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(arrive(i)))
    await asyncio.gather(*tasks)
    return phase


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of an OVERLOADED refusal, or None for any other failure."""
    info = rpc.error_info(err)
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or info is None:
        return None
    if info.reason != "OVERLOADED":
        return None
    for key, value in err.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(retry):
                    return float(retry.retry_delay.ToTimedelta().total_seconds())
    return 0.05


async def capture_all(client: demo.Client, orders: list[str], concurrency: int) -> None:
    """Capture every admitted order as a platform should after payment: until it answers,
    waiting the RetryInfo delay (with jitter) after an OVERLOADED refusal."""
    sem = asyncio.Semaphore(concurrency)
    jitter = random.Random(5)

    async def one(order_id: str) -> None:
        async with sem:
            while True:
                try:
                    await client.ledger.CaptureSubsidy(
                        ledger_pb2.CaptureSubsidyRequest(order_id=order_id)
                    )
                    return
                except grpc.aio.AioRpcError as err:
                    delay = retry_delay_s(err)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay * jitter.uniform(0.5, 1.5))

    await asyncio.gather(*(one(o) for o in orders))


async def prepare(
    client: demo.Client, n: int, rng: random.Random, concurrency: int
) -> list[tuple[str, str]]:
    """``n`` consumers with a phone qualification each (not measured); ``concurrency`` within
    the bound, or eligibility refuses the preparation itself."""
    people: list[tuple[str, str]] = []

    async def one(i: int) -> None:
        people.append(await person(client, rng))

    await timed(n, concurrency, one)
    return people


async def bounded_run(
    root: Path, limit: int, seconds: float, capacity_orders: int, unbounded: bool
) -> dict[str, Any]:
    """Capacity, then 1x and 2x open-loop on a stack with the bound; 2x again without it."""
    rng = random.Random(11)
    overrides = {**RATES, "SUBSIDY_MAX_CONCURRENT_WRITES": str(limit)}
    stack = LocalStack(
        root / "bounded",
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
        settings_overrides=overrides,
    )
    stack.start()
    try:
        client = demo.Client(stack.endpoints())
        try:
            await campaign(client)
            people = await prepare(client, capacity_orders, rng, min(16, limit))
            lat: list[float] = []

            async def reserve(i: int) -> None:
                t = time.perf_counter()
                await client.ledger.ReserveSubsidy(reserve_request(client, f"cap-{i}", people[i]))
                lat.append(time.perf_counter() - t)

            _, wall = await timed(capacity_orders, limit, reserve)
            capacity = capacity_orders / wall
            captured = [f"cap-{i}" for i in range(capacity_orders)]
            need = math.ceil(capacity * seconds * 3) + 10
            people = await prepare(client, need, rng, min(16, limit))
            once = await open_loop(client, Phase("1x capacity", capacity, seconds), people, "x1")
            rest = people[int(capacity * seconds) :]
            twice = await open_loop(client, Phase("2x capacity", 2 * capacity, seconds), rest, "x2")
            admitted = [*captured, *once.admitted_orders, *twice.admitted_orders]
            await capture_all(client, admitted, limit)
            budget = await client.ledger.GetBudget(
                ledger_pb2.GetBudgetRequest(pool_id="bench-pool")
            )
            # Nothing half-applied: exactly the admitted orders are spent, nothing is held.
            assert budget.spent_fen == len(admitted) * SUBSIDY_FEN, (
                budget.spent_fen,
                len(admitted),
            )
            assert budget.reserved_fen == 0, budget.reserved_fen
        finally:
            await client.close()
    finally:
        stack.stop()
    rows = [
        {
            "name": f"capacity: ReserveSubsidy closed-loop at concurrency {limit}",
            "throughput_per_s": round(capacity, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 2),
            "p99_ms": ms(lat, 0.99),
        },
        once.row(),
        twice.row(),
    ]
    if unbounded:
        rows.append(await unbounded_run(root, capacity, seconds))
    return {
        "benchmark": "overload",
        "limit_writes": limit,
        "seconds_per_phase": seconds,
        "capacity_per_s": round(capacity, 1),
        "rows": rows,
    }


async def unbounded_run(root: Path, capacity: float, seconds: float) -> dict[str, Any]:
    """The same 2x load on a stack without the bound: every call queues."""
    rng = random.Random(13)
    overrides = {**RATES, "SUBSIDY_MAX_CONCURRENT_WRITES": "0"}
    stack = LocalStack(
        root / "unbounded",
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
        settings_overrides=overrides,
    )
    stack.start()
    try:
        client = demo.Client(stack.endpoints())
        try:
            await campaign(client)
            people = await prepare(client, math.ceil(2 * capacity * seconds) + 10, rng, 16)
            phase = await open_loop(
                client, Phase("2x capacity, no bound", 2 * capacity, seconds), people, "u2"
            )
        finally:
            await client.close()
    finally:
        stack.stop()
    return phase.row()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.overload")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--capacity-orders", type=int, default=300)
    parser.add_argument("--unbounded", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        result = asyncio.run(
            bounded_run(Path(tmp), args.limit, args.seconds, args.capacity_orders, args.unbounded)
        )
    import json

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
