"""A hot pool split into shards, on the real stack: checkouts spread over its shards, a short
shard takes budget from its siblings, and the pool never overspends."""

from __future__ import annotations

import asyncio
import random

import grpc
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.invariants import check_budget_balanced, check_shards_add_up
from services.kernel.contract import budget
from services.kernel.events import Envelope, payload_of
from services.ledger.projections import load_shards
from subsidy.v1 import eligibility_pb2, ledger_pb2
from tests.e2e.conftest import TEST_PLATFORMS, Platform, eventually, status_of

SUBSIDY = 75_000  # 15% of a 5,000 yuan grade-2 washing machine


async def sharded_pool(p: Platform, rng: random.Random, fen: int, shards: int) -> str:
    pool_id = f"pool-{rng.randrange(10**9)}"
    await p.fund(
        ledger_pb2.ProposeFundingRequest(
            pool_id=pool_id,
            amount_fen=fen,
            source="district",
            platform_ids=TEST_PLATFORMS,
            shards=shards,
        )
    )
    return pool_id


async def check_shards(p: Platform, pool_id: str) -> ledger_pb2.BudgetPool:
    """The pool as GetBudget reports it is balanced, is exactly the sum of its shards' figures
    (each balanced, nothing negative), and each shard's stream folds to that shard's figures."""
    b = await p.ledger.GetBudget(ledger_pb2.GetBudgetRequest(pool_id=pool_id))
    check_budget_balanced(
        pool_id,
        funded=b.funded_fen,
        available=b.available_fen,
        reserved=b.reserved_fen,
        spent=b.spent_fen,
    )
    store = p.running["ledger"].runtime.store
    async with store.engine.connect() as conn:
        _, figures = await load_shards(conn, pool_id)
        rows = await conn.execute(
            text(
                "SELECT stream_id, envelope FROM events WHERE stream_id = :main"
                " OR stream_id LIKE :shards ORDER BY stream_id, stream_version"
            ),
            {"main": budget.shard_stream(pool_id, 0), "shards": f"budget-pool/{pool_id}/%"},
        )
        streams: dict[int, list[Envelope]] = {}
        for stream_id, raw in rows:
            streams.setdefault(budget.stream_shard(stream_id)[1], []).append(
                Envelope.FromString(raw)
            )
    check_shards_add_up(
        pool_id,
        {
            "funded": b.funded_fen,
            "available": b.available_fen,
            "reserved": b.reserved_fen,
            "spent": b.spent_fen,
        },
        {
            k: {
                "funded": f.funded,
                "available": f.available,
                "reserved": f.reserved,
                "spent": f.spent,
            }
            for k, f in figures.items()
        },
    )
    for shard, envs in streams.items():
        folded = budget.fold(pool_id, (payload_of(e) for e in envs))
        assert (folded.funded, folded.available, folded.reserved, folded.spent) == (
            figures[shard].funded,
            figures[shard].available,
            figures[shard].reserved,
            figures[shard].spent,
        ), shard
    return b


async def test_thirty_concurrent_reservations_on_one_sharded_pool_never_overspend(
    platform: Platform, rng: random.Random
) -> None:
    """30 checkouts race on ONE pool split over 4 shards whose budget fits only 12: exactly 12
    win, however the orders hash over the shards (short shards take from their siblings), the
    18 others are refused BUDGET_EXHAUSTED, and no shard nor the pool overspends."""
    p = platform
    sku = await p.product(rng, "washing_machine", 2, 500_000)
    pool = await sharded_pool(p, rng, 12 * SUBSIDY + 74_999, 4)
    before = await check_shards(p, pool)
    assert before.shards == 4
    # Preparation, ten at a time (a loaded machine's authority simulator times out on more).
    people = [
        person
        for _ in range(3)
        for person in await asyncio.gather(*(p.person(rng) for _ in range(10)))
    ]
    quals = [
        q
        for b in range(3)
        for q in await asyncio.gather(
            *(p.claim(c, "washing_machine") for _, c in people[b * 10 : b * 10 + 10])
        )
    ]

    async def checkout(i: int) -> str:
        try:
            await p.ledger.ReserveSubsidy(
                ledger_pb2.ReserveSubsidyRequest(
                    order_id=f"race-{pool}-{i}",
                    platform_id="jd",
                    pool_id=pool,
                    consumer_id=people[i][1],
                    qualification_id=quals[i],
                    sku=sku,
                    unit_price_fen=500_000,
                ),
                # The whole stack shares this process: on a loaded machine the 30 calls queue
                # for the CPU longer than the default deadline before any lock is taken.
                timeout=60,
            )
            return "ok"
        except grpc.aio.AioRpcError as err:
            code, reason, _ = status_of(err)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, reason)
            return reason

    outcomes = await asyncio.gather(*(checkout(i) for i in range(30)))
    assert outcomes.count("ok") == 12
    assert outcomes.count("BUDGET_EXHAUSTED") == 18
    b = await check_shards(p, pool)
    assert (b.reserved_fen, b.available_fen) == (12 * SUBSIDY, 74_999)
    async with p.running["ledger"].runtime.store.engine.connect() as conn:
        held_by: dict[int, int] = dict(
            (
                await conn.execute(
                    text(
                        "SELECT shard, count(*) FROM reservations WHERE pool_id = :p GROUP BY shard"
                    ),
                    {"p": pool},
                )
            ).all()
        )
    assert sum(held_by.values()) == 12 and len(held_by) > 1  # spread over shards

    async def refused_unlocked() -> None:
        statuses = [
            (
                await p.eligibility.GetQualification(
                    eligibility_pb2.GetQualificationRequest(qualification_id=q)
                )
            ).status
            for q in quals
        ]
        assert statuses.count("LOCKED") == 12 and statuses.count("AVAILABLE") == 18

    await eventually(refused_unlocked)

    # Capture and cancel on whichever shard holds each order: the money goes where it was.
    won = [i for i, o in enumerate(outcomes) if o == "ok"]
    await asyncio.gather(
        *(
            p.ledger.CaptureSubsidy(
                ledger_pb2.CaptureSubsidyRequest(
                    order_id=f"race-{pool}-{i}", paid_amount_fen=500_000 - SUBSIDY
                )
            )
            for i in won[:7]
        ),
        *(
            p.ledger.ReleaseSubsidy(
                ledger_pb2.ReleaseSubsidyRequest(order_id=f"race-{pool}-{i}", reason="CANCELLED")
            )
            for i in won[7:]
        ),
    )
    b = await check_shards(p, pool)
    assert (b.spent_fen, b.reserved_fen, b.available_fen) == (
        7 * SUBSIDY,
        0,
        5 * SUBSIDY + 74_999,
    )

    # Operators see the whole pool on /metrics, summed over its shards from what committed
    # (off the checkout path: services.ledger.projections.ShardedGauges), and its source too.
    def gauges(metric: str, **labels: str) -> dict[str, float | None]:
        return {
            bucket: REGISTRY.get_sample_value(metric, {"pool": pool, **labels, "bucket": bucket})
            for bucket in ("funded", "available", "reserved", "spent")
        }

    whole = {
        "funded": float(b.funded_fen),
        "available": float(5 * SUBSIDY + 74_999),
        "reserved": 0.0,
        "spent": float(7 * SUBSIDY),
    }

    async def gauges_show_the_pool() -> None:
        assert gauges("subsidy_budget_fen") == whole
        assert gauges("subsidy_budget_source_fen", source="district") == whole

    await eventually(gauges_show_the_pool)


async def test_the_audit_log_alone_adds_up_to_a_sharded_pool(
    platform: Platform, rng: random.Random
) -> None:
    """subsidyctl audit verify folds each shard's stream from the log and sums them: the pool
    it rebuilds is the one the ledger reports."""
    from subsidyctl.cli.audit import verify

    pool = await sharded_pool(platform, rng, 10 * SUBSIDY, 3)
    await check_shards(platform, pool)
    await platform.quiesce()
    report = await verify(platform.audit, platform.ledger, platform.event_logs)
    assert report["ok"]
    b = await check_shards(platform, pool)
    assert report["pools"][pool] == {
        "funded_fen": b.funded_fen,
        "available_fen": b.available_fen,
        "reserved_fen": b.reserved_fen,
        "spent_fen": b.spent_fen,
    }
    assert not any("/" in pool_id for pool_id in report["pools"])  # shards are not pools
