"""Benchmark: the checkout's hot path (ReserveSubsidy, then CaptureSubsidy) over gRPC.

Real PostgreSQL, NATS and OpenBao, and each service in its own process as in production (the
stack `make run` starts, on free ports); the client runs in this process. Every order of one
run draws on ONE budget pool: the worst case, since reservations on a pool serialise on its
stream lock.

Reports throughput and p50/p99 latency, and the same-run baseline (a gRPC health check against the
ledger at the same concurrency) as a ratio, so a slower or busier machine shows as a baseline
change, not as a regression. Also the CPU each part of the stack spends per checkout (psutil,
user + system, before and after reserve + capture) and the peak resident memory of every
service process under the load. ``--workers N`` runs N worker processes per service on each
port (SUBSIDY_WORKERS; services/kernel/workers.py); its result is checkout-<N>workers.json.
Usage: python -m bench.checkout [--orders N] [--concurrency C] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.claim_rush import CpuMeter
from bench.common import RssMeter, against_baseline, report, summarise, timed
from services.kernel import rpc
from services.kernel.identity import Role
from subsidy.v1 import catalog_pb2, eligibility_pb2, ledger_pb2
from subsidyctl import demo
from subsidyctl.demo import IN_REGION
from subsidyctl.localstack import LocalStack, Ports, free_base


async def run(orders: int, concurrency: int, root: Path, workers: int = 1) -> dict[str, Any]:
    """The services as separate processes (as in production), on free ports; ``workers``
    processes per service, each port shared by them."""
    stack = LocalStack(
        root,
        Ports(free_base()),
        durable=False,
        log=io.StringIO(),
        workers=workers,
    )
    stack.start()
    try:
        client = demo.Client(stack.endpoints())
        try:
            async with RssMeter() as rss:
                result = await measure(client, stack.endpoints(), orders, concurrency)
            result["workers_per_service"] = workers
            # Peak resident memory of each service process (MB) over the whole run.
            result["rss_mb"] = dict(sorted(rss.peak_mb.items()))
            result["load_average"] = [round(x, 2) for x in os.getloadavg()]
            return result
        finally:
            await client.close()
    finally:
        stack.stop()


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

    meter = CpuMeter()
    cpu0 = meter.sample()
    res_lat, res_wall = await timed(orders, concurrency, reserve)
    cap_lat, cap_wall = await timed(orders, concurrency, capture)
    cpu2 = meter.sample()
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
    return {
        "benchmark": "checkout",
        "orders": orders,
        "concurrency": concurrency,
        "rows": rows,
        # CPU ms per checkout (reserve + capture) by part of the stack
        "cpu_ms_per_checkout": CpuMeter.per_op(cpu0, cpu2, orders),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout")
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per service")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        result = asyncio.run(run(args.orders, args.concurrency, Path(tmp), args.workers))
    print(
        f"checkout: {args.orders} orders, concurrency {args.concurrency}, one budget pool,"
        f" {args.workers} worker process(es) per service"
    )
    report("checkout" if args.workers == 1 else f"checkout-{args.workers}workers", result)
    print("CPU ms per checkout:", result["cpu_ms_per_checkout"])
    print("peak RSS MB:", result["rss_mb"])
    return result


if __name__ == "__main__":
    main()
