"""Benchmark: the checkout's hot path (ReserveSubsidy, then CaptureSubsidy) over gRPC.

Real PostgreSQL, NATS and OpenBao, and each service in its own process as in production (the
stack `make run` starts, on free ports); the client runs in this process. Every order of one
run draws on ONE budget pool: the worst case, since reservations on a pool serialise on its
stream lock.

Reports throughput and p50/p99 latency, and the same-run baseline (a gRPC health check against the
ledger at the same concurrency) as a ratio, so a slower or busier machine shows as a baseline
change, not as a regression. Usage: python -m bench.checkout [--orders N] [--concurrency C]
[--one-pool] [--shards K]: with K > 1, the same run also reserves as many orders again on one
pool split into K shards (PoolSharded) and reports its throughput and CPU per reservation per
process against the one-shard pool's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import tempfile
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import against_baseline, report, summarise, timed
from services.kernel import rpc
from services.kernel.identity import Role
from subsidy.v1 import catalog_pb2, eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import SERVICES, LocalStack, Ports, free_base


async def run(orders: int, concurrency: int, root: Path, shards: int = 1) -> dict[str, Any]:
    """The services as separate processes (as in production), on free ports."""
    stack = LocalStack(root, Ports(free_base()), durable=False, log=io.StringIO())
    stack.start()
    try:
        client = demo.Client(stack.endpoints())
        try:
            result = await measure(client, stack.endpoints(), orders, concurrency)
            if shards > 1:
                pids = {name: stack.pid(name) for name in SERVICES}
                assert stack.pg is not None
                postmaster = (stack.pg.data_dir / "postmaster.pid").read_text().split()[0]
                pids["postgres"] = int(postmaster)  # and its backends
                result["shards"] = await shard_comparison(client, pids, orders, concurrency, shards)
            return result
        finally:
            await client.close()
    finally:
        stack.stop()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """Each process's CPU time so far (user + system), and this client's."""
    import os

    import psutil

    def used(process: psutil.Process) -> float:
        with contextlib.suppress(psutil.NoSuchProcess):
            return float(sum(process.cpu_times()[:2]))
        return 0.0  # a backend that exited between listing and reading

    out = {}
    for name, pid in pids.items():
        process = psutil.Process(pid)
        children = process.children(recursive=True) if name == "postgres" else []
        out[name] = used(process) + sum(used(c) for c in children)
    out["bench client"] = used(psutil.Process(os.getpid()))
    return out


async def shard_comparison(
    client: demo.Client, pids: dict[str, int], orders: int, concurrency: int, shards: int
) -> dict[str, Any]:
    """ReserveSubsidy on ONE pool, first of 1 shard then of ``shards``, same orders and
    concurrency in the same run: throughput, p50/p99, and CPU ms per reservation per process
    (the machine is shared: the ratios are the figure to read, with the load average)."""
    import os

    rng = random.Random(11)
    for pool_id, k in (("bench-one-shard", 1), ("bench-sharded", shards)):
        proposal = await client.ledger.ProposeFunding(
            ledger_pb2.ProposeFundingRequest(
                pool_id=pool_id,
                amount_fen=10**12,
                source="district",
                reason="bench",
                platform_ids=[client.platform_id],
                shards=k,
            )
        )
        await client.ledger.ApproveFunding(
            ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="bench")
        )
    people: list[tuple[str, str]] = []

    async def prepare(i: int) -> None:
        people.append(await person(client, rng))

    await timed(2 * orders, concurrency, prepare)
    out: dict[str, Any] = {"shards": shards, "load_average_before": os.getloadavg()}
    rows = []
    for label, pool_id, offset in (
        ("1 shard", "bench-one-shard", 0),
        (f"{shards} shards", "bench-sharded", orders),
    ):

        async def reserve(i: int, pool_id: str = pool_id, offset: int = offset) -> None:
            request = reserve_request(client, f"{pool_id}-{i}", people[offset + i])
            request.pool_id = pool_id
            await client.ledger.ReserveSubsidy(request)

        before = cpu_seconds(pids)
        lat, wall = await timed(orders, concurrency, reserve)
        after = cpu_seconds(pids)
        row = summarise(f"ReserveSubsidy, one pool of {label}", lat, wall)
        row["cpu_ms_per_reserve"] = {
            name: round((after[name] - before[name]) * 1000 / orders, 2) for name in after
        }
        row["cpu_ms_per_reserve_total"] = round(sum(row["cpu_ms_per_reserve"].values()), 2)
        rows.append(row)
        figures = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
        assert figures.reserved_fen == orders * 45_000, "every order must have been held"
        assert figures.shards == (shards if offset else 1)
    out["rows"] = rows
    out["throughput_ratio"] = round(rows[1]["throughput_per_s"] / rows[0]["throughput_per_s"], 3)
    out["load_average_after"] = os.getloadavg()
    return out


async def campaign(client: demo.Client) -> None:
    """The merchant, its phone (subsidy 45,000 fen) and one funded pool the orders draw on."""
    await client.catalog.ApplyMerchant(
        catalog_pb2.ApplyMerchantRequest(
            merchant_id="bench-m",
            name="bench",
            licence_number="91440300MA5DC6QX4Y",
            contact_phone="13800000000",
        )
    )
    await client.catalog.ReviewMerchant(
        catalog_pb2.ReviewMerchantRequest(merchant_id="bench-m", approve=True)
    )
    await client.catalog.RegisterProduct(
        catalog_pb2.RegisterProductRequest(
            sku="bench-phone",
            merchant_id="bench-m",
            category="phone",
            brand="b",
            model="m",
            list_price_fen=300_000,
        )
    )
    proposal = await client.ledger.ProposeFunding(
        ledger_pb2.ProposeFundingRequest(
            pool_id="bench-pool",
            amount_fen=10**12,
            source="district",
            reason="bench",
            platform_ids=[client.platform_id],
        )
    )
    await client.ledger.ApproveFunding(
        ledger_pb2.ApproveFundingRequest(proposal_id=proposal.proposal_id, reason="bench")
    )


async def person(client: demo.Client, rng: random.Random) -> tuple[str, str]:
    """A registered consumer and the phone qualification they claimed: (consumer, qualification)."""
    consumer = await demo.register(client, demo.generate_person(rng))
    q = await client.eligibility.ClaimQualification(
        eligibility_pb2.ClaimQualificationRequest(
            circumstances=IN_REGION,
            consumer_id=consumer.consumer_id,
            category="phone",
            channel=client.platform_id,
        )
    )
    return consumer.consumer_id, q.qualification_id


def reserve_request(
    client: demo.Client, order_id: str, who: tuple[str, str]
) -> ledger_pb2.ReserveSubsidyRequest:
    """The checkout's reservation of the bench phone for ``who`` (consumer, qualification)."""
    return ledger_pb2.ReserveSubsidyRequest(
        order_id=order_id,
        platform_id=client.platform_id,
        pool_id="bench-pool",
        consumer_id=who[0],
        qualification_id=who[1],
        sku="bench-phone",
        unit_price_fen=300_000,
    )


async def measure(
    client: demo.Client, endpoints: dict[str, str], orders: int, concurrency: int
) -> dict[str, Any]:
    rng = random.Random(7)
    await campaign(client)
    # Preparation (not the hot path): register consumers and claim their qualifications.
    people: list[tuple[str, str]] = []

    async def prepare(i: int) -> None:
        people.append(await person(client, rng))

    prep_lat, prep_wall = await timed(orders, concurrency, prepare)

    # The baseline pays the same mutual TLS as the checkout: the platform's own channel.
    async with rpc.channel(endpoints["ledger"], client.identities.by_role[Role.PLATFORM]) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def check(i: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest())

        base_lat, base_wall = await timed(orders, concurrency, check)

    async def reserve(i: int) -> None:
        await client.ledger.ReserveSubsidy(reserve_request(client, f"bench-{i}", people[i]))

    async def capture(i: int) -> None:
        await client.ledger.CaptureSubsidy(ledger_pb2.CaptureSubsidyRequest(order_id=f"bench-{i}"))

    res_lat, res_wall = await timed(orders, concurrency, reserve)
    cap_lat, cap_wall = await timed(orders, concurrency, capture)
    budget = await client.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id="bench-pool"))
    assert budget.spent_fen == orders * 45_000, "every benchmark order must have been captured"
    baseline = summarise("baseline: gRPC health check (ledger)", base_lat, base_wall)
    rows = [
        summarise("prepare: RegisterConsumer + ClaimQualification", prep_lat, prep_wall),
        baseline,
        summarise(
            "ReserveSubsidy (verify item, lock qualification, hold budget)", res_lat, res_wall
        ),
        summarise("CaptureSubsidy", cap_lat, cap_wall),
    ]
    against_baseline(rows, baseline)
    return {"benchmark": "checkout", "orders": orders, "concurrency": concurrency, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout")
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    # Every order on one pool is what this benchmark does (the hot pool); the flag says so.
    parser.add_argument("--one-pool", action="store_true", help="all orders on one pool")
    parser.add_argument(
        "--shards", type=int, default=1, help="also reserve on one pool of K shards (K > 1)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        result = asyncio.run(run(args.orders, args.concurrency, Path(tmp), args.shards))
    print(f"checkout: {args.orders} orders, concurrency {args.concurrency}, one budget pool")
    report("checkout", result)
    if "shards" in result:
        compared = result["shards"]
        for row in compared["rows"]:
            print(
                f"{row['name']}: {row['throughput_per_s']:.1f}/s, p50 {row['p50_ms']:.1f} ms,"
                f" p99 {row['p99_ms']:.1f} ms, CPU {row['cpu_ms_per_reserve_total']:.1f} ms"
                f" per reserve {row['cpu_ms_per_reserve']}"
            )
        print(
            f"{compared['shards']} shards vs 1: {compared['throughput_ratio']:.3f}x throughput"
            f" (load average {compared['load_average_before']} -> "
            f"{compared['load_average_after']})"
        )
    return result


if __name__ == "__main__":
    main()
