"""Benchmark: the floor under issue 14's checkout target, measured in one run on the real stack.

The floor is the sum over the hops a checkout pays of (hops per checkout) x (CPU ms per hop),
each cost measured here as CPU summed over the client and every server process (bench.claim_rush's
CpuMeter: the client, the services, PostgreSQL's backends) and each count read at run time from
the stack itself, never written down. The implied ceiling on ``cores`` cores is
``cores * 1000 / floor`` checkouts a second.

This first step measures two hops: (a) a gRPC health check over mutual TLS (the same-run
baseline), counted once per RPC the services served during the checkouts (every service's
``subsidy_rpc_duration_seconds_count`` on its /metrics, before and after: the platform's reserve
and capture and the ledger's calls to catalog and eligibility), and (c) one PostgreSQL commit of
one row, counted by pg_stat_database's xact_commit delta over the checkouts, summed over the
databases. The stack runs as bench.checkout runs it (``durable=False``: fsync off), so the
commit's cost is the one the measured checkout paid, not production's.

What the floor leaves out (so the measured checkout is above it by design): the NATS JetStream
publish and consumer delivery (hop d), the event store's append beyond its commit (hop e), the
SQL statements inside each transaction beyond the commit itself, the application's own Python,
and OpenBao.
Usage: python -m bench.floor [--orders N] [--concurrency C] [--commits N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.checkout import campaign, person, pool_of, reserve_request
from bench.claim_rush import CpuMeter
from bench.common import timed, write_result
from services.kernel import rpc
from services.kernel.identity import Role
from subsidy.v1 import ledger_pb2
from subsidyctl import demo
from subsidyctl.localstack import LocalStack, Ports, free_base

QUICK_ARGV = ("--orders", "20", "--concurrency", "4", "--commits", "200")


@dataclass(frozen=True)
class Hop:
    """One hop a checkout pays: its CPU ms per operation and how many a checkout makes."""

    name: str
    cpu_ms: float
    per_checkout: float

    @property
    def ms_per_checkout(self) -> float:
        """This hop's share of the floor, CPU ms per checkout."""
        return self.cpu_ms * self.per_checkout


def floor_ms(hops: list[Hop]) -> float:
    """The floor: CPU ms per checkout that the measured hops alone cost."""
    return sum(h.ms_per_checkout for h in hops)


def ceiling_per_s(floor: float, cores: int = 2) -> float:
    """The checkouts a second ``cores`` cores could at most do if a checkout cost only ``floor``."""
    return cores * 1000.0 / floor if floor > 0 else float("inf")


def commits(conninfo: str) -> dict[str, int]:
    """xact_commit per database (pg_stat_database), read now."""
    with psycopg.connect(conninfo, autocommit=True) as db:
        rows = db.execute(
            "SELECT datname, xact_commit FROM pg_stat_database WHERE datname IS NOT NULL"
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


SERVICES = ("catalog", "eligibility", "ledger", "audit")


def served(stack: LocalStack) -> dict[str, float]:
    """RPCs each service has answered so far (any outcome), from its /metrics."""
    counts: dict[str, float] = {}
    for service in SERVICES:
        url = f"http://127.0.0.1:{stack.ports.metrics(service)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
        counts[service] = sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "subsidy_rpc_duration_seconds_count"
        )
    return counts


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The per-database increase from ``before`` to ``after`` (databases that moved only)."""
    moved = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(moved.items()) if v > 0}


async def commit_hop(conninfo: str, n: int, concurrency: int) -> tuple[float, float]:
    """CPU ms per one-row commit (client + PostgreSQL) and commits a second at ``concurrency``."""
    with psycopg.connect(conninfo, autocommit=True) as db:
        db.execute("CREATE TABLE IF NOT EXISTS bench_floor (id bigint PRIMARY KEY)")
    conns = [await psycopg.AsyncConnection.connect(conninfo) for _ in range(concurrency)]
    free: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def one(i: int) -> None:
        conn = await free.get()
        try:
            await conn.execute("INSERT INTO bench_floor (id) VALUES (%s)", (i,))
            await conn.commit()
        finally:
            free.put_nowait(conn)

    try:
        meter = CpuMeter()
        cpu0 = meter.sample()
        _, wall = await timed(n, concurrency, one)
        cpu1 = meter.sample()
    finally:
        for c in conns:
            await c.close()
    return CpuMeter.per_op(cpu0, cpu1, n)["total"], n / wall


async def measure(
    stack: LocalStack, orders: int, concurrency: int, n_commits: int
) -> dict[str, Any]:
    """The hops' costs, the counts per checkout over ``orders`` checkouts, and the floor."""
    assert stack.pg is not None
    su = stack.pg.conninfo("postgres")
    client = demo.Client(stack.endpoints(), deadline_s=30)
    try:
        rng = random.Random(7)
        await campaign(client)
        people = [await person(client, rng) for _ in range(orders)]
        meter = CpuMeter()
        async with rpc.channel(
            stack.endpoints()["ledger"], client.identities.by_role[Role.PLATFORM]
        ) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def check(i: int) -> None:
                await health.Check(health_pb2.HealthCheckRequest())

            h0 = meter.sample()
            _, h_wall = await timed(orders * 4, concurrency, check)
            h1 = meter.sample()
        health_ms = CpuMeter.per_op(h0, h1, orders * 4)["total"]

        async def checkout(i: int) -> None:
            await client.ledger.ReserveSubsidy(
                reserve_request(client, f"floor-{i}", people[i], pool_of(i, 1))
            )
            await client.ledger.CaptureSubsidy(
                ledger_pb2.CaptureSubsidyRequest(order_id=f"floor-{i}")
            )

        r0 = served(stack)
        x0 = commits(su)
        c0 = meter.sample()
        _, c_wall = await timed(orders, concurrency, checkout)
        c1 = meter.sample()
        # The consumers commit after the RPCs return: let them drain before reading the count.
        await asyncio.sleep(2)
        x1 = commits(su)
        r1 = served(stack)
    finally:
        await client.close()
    commit_ms, commit_rate = await commit_hop(su, n_commits, concurrency)
    per_db = delta(x0, x1)
    per_db.pop("postgres", None)  # this benchmark's own reads of pg_stat_database
    rpcs = {k: r1[k] - r0.get(k, 0.0) for k in r1}
    hops = [
        Hop("gRPC call over mTLS (a health check's cost)", health_ms, sum(rpcs.values()) / orders),
        Hop("PostgreSQL one-row commit", commit_ms, sum(per_db.values()) / orders),
    ]
    floor = floor_ms(hops)
    checkout_ms = CpuMeter.per_op(c0, c1, orders)["total"]
    return {
        "benchmark": "floor",
        "operation": "checkout (reserve + capture) against its measured floor",
        "throughput_per_s": round(orders / c_wall, 1),
        "baseline": "ceiling on 2 cores if a checkout cost only the floor",
        "baseline_per_s": round(ceiling_per_s(floor), 1),
        "ratio": round(orders / c_wall / ceiling_per_s(floor), 3) if floor else None,
        "orders": orders,
        "concurrency": concurrency,
        "hops": [
            {
                "name": h.name,
                "cpu_ms": round(h.cpu_ms, 3),
                "per_checkout": round(h.per_checkout, 2),
                "ms_per_checkout": round(h.ms_per_checkout, 3),
            }
            for h in hops
        ],
        "health_checks_per_s": round(orders * 4 / h_wall, 1),
        "commits_per_s": round(commit_rate, 1),
        "rpcs_per_checkout_by_service": {k: round(v / orders, 2) for k, v in rpcs.items()},
        "commits_per_checkout_by_db": {k: round(v / orders, 2) for k, v in per_db.items()},
        "floor_cpu_ms_per_checkout": round(floor, 3),
        "ceiling_checkouts_per_s_2_cores": round(ceiling_per_s(floor), 1),
        "checkout_cpu_ms": round(checkout_ms, 3),
        "checkout_vs_floor": round(checkout_ms / floor, 2) if floor else None,
        "checkouts_per_s": round(orders / c_wall, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Start the stack, measure, print the table, write bench/results/floor.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--commits", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        stack = LocalStack(Path(tmp), Ports(free_base()), durable=False, log=io.StringIO())
        stack.settings_overrides = {
            "SUBSIDY_RATE_CHECKOUT": "1000000/second",
            "SUBSIDY_RATE_CLAIMS": "1000000/second",
            "SUBSIDY_RATE_REGISTRATION": "1000000/second",
        }
        stack.start()
        try:
            result = asyncio.run(measure(stack, args.orders, args.concurrency, args.commits))
        finally:
            stack.stop()
    print(f"floor: load average {result['load_average']}")
    print(f"  {'hop':44} {'ms/op':>8} {'x/checkout':>10} {'ms/checkout':>11}")
    for h in result["hops"]:
        print(
            f"  {h['name']:44} {h['cpu_ms']:8.3f} {h['per_checkout']:10.2f}"
            f" {h['ms_per_checkout']:11.3f}"
        )
    print(f"  RPCs served per checkout: {result['rpcs_per_checkout_by_service']}")
    print(f"  commits per checkout: {result['commits_per_checkout_by_db']}")
    print(
        f"  floor {result['floor_cpu_ms_per_checkout']} ms, ceiling"
        f" {result['ceiling_checkouts_per_s_2_cores']}/s on 2 cores; measured checkout"
        f" {result['checkout_cpu_ms']} ms = {result['checkout_vs_floor']}x the floor"
    )
    write_result("floor", result)
    return result


if __name__ == "__main__":
    main()
